"""A fake driver for unit tests of the kernel: no model, deterministic tokens.

Tokens are Unicode code points: ``tokenize`` maps each character to its code point and
the next token after ``t`` is scripted by ``script`` (default: the next letter), so
tests can predict every byte of a stream. Token 0 is the end-of-generation token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import trio

from axfs.kernel import Kernel
from axfs.runtime import LocalRuntime
from drivers.base import (
    ContextShape,
    DriverError,
    ModelInfo,
    Piece,
    Sampling,
    SeqState,
    StepAborted,
)

EOG = 0


def next_letter(token: int) -> int:
    return ord("a") + (token - ord("a") + 1) % 26 if ord("a") <= token <= ord("z") else ord("a")


class FakeDriver:
    def __init__(self, n_ctx: int = 1024, n_seq_max: int = 4, n_batch: int = 64,
                 script: Callable[[int], int] = next_letter, context_length: int = 4096) -> None:
        self.info = ModelInfo(name="fake", path="/dev/null", architecture="fake",
                              description="fake 0M F32", parameters=0, size_bytes=0,
                              context_length=context_length, vocab_size=0x110000, device="none")
        self.shape = ContextShape(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch, cell_bytes=2)
        self.script = script
        self.steps: list[list[Piece]] = []
        self.open: dict[int, Sampling] = {}
        self.positions: dict[int, int] = {}  # next position each sequence expects
        self.fail_next: str | None = None
        self.fail_seq: int | None = None  # every step with this sequence in it fails
        self.saves = self.restores = self.aborted = 0
        self.copies: list[tuple[int, int, int]] = []
        self.aborting = False
        self.step_delay = 0.0  # seconds a step takes per piece

    def tokenize(self, text: str, bos: bool = True, *, special: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def piece(self, token: int) -> bytes:
        return chr(token).encode() if token != EOG else b""

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def open_seq(self, seq: int, sampling: Sampling) -> None:
        self.open[seq] = sampling
        self.positions.setdefault(seq, 0)

    def close_seq(self, seq: int) -> None:
        self.open.pop(seq, None)
        self.positions.pop(seq, None)

    def copy_seq(self, src: int, dst: int, n: int) -> None:
        if self.positions.get(src, 0) < n or self.positions.get(dst, 0):
            raise DriverError(f"cannot copy {n} cells of {src} into {dst}")
        self.positions[dst] = n
        self.copies.append((src, dst, n))

    def trim_seq(self, seq: int, n: int) -> None:
        if self.positions.get(seq, 0) < n:
            raise DriverError(f"cannot trim {seq} to {n}")
        self.positions[seq] = n

    def seq_cells(self, seq: int) -> int:
        return self.positions.get(seq, 0)

    def save_seq(self, seq: int, keep_kv: bool) -> SeqState:
        cells = self.positions.pop(seq, 0)
        state = SeqState(sampler=self.open.pop(seq), kv=bytes(2 * cells) if keep_kv else None,
                         kv_bytes=2 * cells if keep_kv else 0)
        self.saves += 1
        return state

    def restore_seq(self, seq: int, state: SeqState) -> None:
        self.open[seq] = state.sampler  # type: ignore[assignment]
        if isinstance(state.kv, bytes | bytearray):
            self.positions[seq] = len(state.kv) // 2
        else:
            self.positions.setdefault(seq, 0)
        self.restores += 1

    def abort(self, stop: bool = True) -> None:
        self.aborting = stop

    def step(self, pieces: list[Piece]) -> dict[int, int]:
        deadline = time.monotonic() + self.step_delay * len(pieces)
        while time.monotonic() < deadline and not self.aborting:
            time.sleep(0.001)  # a slow step, longer the bigger the batch, as on a CPU
        if self.aborting:
            self.aborted += 1
            raise StepAborted("aborted")
        if self.fail_next:
            message, self.fail_next = self.fail_next, None
            raise DriverError(message)
        if self.fail_seq is not None and any(p.seq == self.fail_seq for p in pieces):
            raise DriverError(f"sequence {self.fail_seq} is poisoned")
        if sum(len(p.tokens) for p in pieces) > self.shape.n_batch:
            raise DriverError("over n_batch")
        self.steps.append(pieces)
        out = {}
        for p in pieces:
            if p.seq not in self.open:
                raise DriverError(f"sequence {p.seq} is not open")
            if p.pos != self.positions[p.seq]:
                raise DriverError(f"sequence {p.seq} at {p.pos}, expected {self.positions[p.seq]}")
            self.positions[p.seq] += len(p.tokens)
            if p.sample:
                out[p.seq] = self.script(p.tokens[-1])
        return out

    def close(self) -> None:
        self.open.clear()


class GatedDriver(FakeDriver):
    """A step runs only once the test has opened the gate for it."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.gate = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)

    def step(self, pieces: list[Piece]) -> dict[int, int]:
        self.entered.release()
        self.gate.acquire()
        return super().step(pieces)


async def step_in_flight(driver: GatedDriver) -> None:
    """Wait until the engine is inside a step (held at the gate)."""
    with trio.fail_after(5):
        while not driver.entered.acquire(blocking=False):
            await trio.sleep(0.001)


async def run_steps(driver: GatedDriver, n: int) -> None:
    for _ in range(n):
        await step_in_flight(driver)
        driver.gate.release()


async def settle(driver: GatedDriver, done: Callable[[], bool]) -> None:
    """Let steps run until ``done`` holds and the engine is idle."""
    with trio.fail_after(5):
        while not done():
            if driver.entered.acquire(blocking=False):
                driver.gate.release()
            await trio.sleep(0.001)
        for _ in range(3):  # steps that clear freed slots
            if driver.entered.acquire(blocking=False):
                driver.gate.release()
            await trio.sleep(0.01)


def local(kernel: Kernel) -> LocalRuntime:
    """The runtime of ``kernel``'s default model: its driver, engine, scheduler and KV
    manager, which unit tests look into."""
    runtime = kernel.local()
    if runtime is None:
        raise AssertionError("the kernel has no local default model")
    return runtime
