"""Swap space: where preempted sequences' saved KV waits until they run again.

Saved states stay in host memory up to ``mem_limit`` bytes; beyond that they are
written to files in the state directory and read back when their task is admitted
again. The counters are what ``/ax/memory`` shows. ``put`` and ``take`` run in the
engine's worker thread, next to the driver calls that save and restore.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from drivers.base import SeqState

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class SwapFile:
    """A saved KV state written to disk."""

    path: Path
    size: int


class SwapSpace:
    def __init__(self, mem_limit: int, directory: Path | None) -> None:
        self.mem_limit = mem_limit
        self.directory = directory
        self.mem_bytes = self.mem_count = 0
        self.disk_bytes = self.disk_count = 0
        self.outs = self.out_bytes = 0
        self.ins = self.in_bytes = 0
        self.errors = 0  # swap files that could not be written (their KV stayed in memory)
        self.on_error: Callable[[str, str], None] | None = None  # (task, reason), in trio's thread

    @staticmethod
    def where(state: object) -> str:
        if not isinstance(state, SeqState) or state.kv is None:
            return ""
        return "disk" if isinstance(state.kv, SwapFile) else "mem"

    def put(self, name: str, state: SeqState) -> SeqState:
        """Keep ``state`` in memory if the budget allows, else write its KV to a file."""
        if state.kv is None:
            return state
        self.outs += 1
        self.out_bytes += state.kv_bytes
        if self.mem_bytes + state.kv_bytes <= self.mem_limit or self.directory is None:
            self.mem_bytes += state.kv_bytes
            self.mem_count += 1
            return state
        path = self.directory / f"{name}.kv"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(memoryview(state.kv))  # type: ignore[arg-type]
        except OSError as e:
            # A full or failing state directory must not stop the task: its KV stays in
            # memory, over the limit, and the error is reported.
            with contextlib.suppress(OSError):
                os.unlink(path)
            self._report(name, f"cannot write swap file {path}: {e.strerror or e}; "
                               f"kept in memory")
            self.mem_bytes += state.kv_bytes
            self.mem_count += 1
            return state
        self.disk_bytes += state.kv_bytes
        self.disk_count += 1
        return SeqState(sampler=state.sampler, kv=SwapFile(path, state.kv_bytes),
                        kv_bytes=state.kv_bytes)

    def _report(self, name: str, reason: str) -> None:
        self.errors += 1
        log.error("task %s: %s", name, reason)
        if self.on_error is None:
            return
        try:
            trio.from_thread.run_sync(self.on_error, name, reason)
        except RuntimeError:  # not in a trio worker thread: already in trio's (tests)
            self.on_error(name, reason)

    def take(self, state: SeqState) -> SeqState:
        """``state`` with its KV back in memory, for the driver to restore."""
        if state.kv is None:
            return state
        self.ins += 1
        self.in_bytes += state.kv_bytes
        if not isinstance(state.kv, SwapFile):
            self._forget(state)
            return state
        data = bytearray(state.kv.size)
        with open(state.kv.path, "rb") as f:
            if f.readinto(data) != state.kv.size:
                raise OSError(f"swap file {state.kv.path} is short")
        self.discard(state)
        return SeqState(sampler=state.sampler, kv=data, kv_bytes=state.kv_bytes)

    def discard(self, state: object) -> None:
        """Forget a saved state that will never be restored (its task ended)."""
        if isinstance(state, SeqState) and state.kv is not None:
            self._forget(state)

    def _forget(self, state: SeqState) -> None:
        if isinstance(state.kv, SwapFile):
            self.disk_bytes -= state.kv_bytes
            self.disk_count -= 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(state.kv.path)
        else:
            self.mem_bytes -= state.kv_bytes
            self.mem_count -= 1
