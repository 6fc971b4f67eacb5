"""The thinnest tree: what the mounted tree costs when the tree does nothing but FUSE.

pyfuse3 and trio serve tasks/ID/{config,prompt,stream,status} and trace, as much of them
as tools/bench/throughput's rounds use, and one thread steps axfs's llama.cpp driver as
tools/bench/baselines.py's ``Raw`` does (every prompt that has come, then one token a
sequence a step), handing each step's text to trio in one call. No scheduler, no KV
accounting, no journal, no trace events beyond ``submit``, no checks of any input.
tools/bench/floor mounts it beside axfs and the raw driver: it is the floor of this
stack (pyfuse3, trio, the kernel's FUSE, the ``cat``s, the cores they share with the
model), so the share of the model's rate it loses is not axfs's to win back.

How a stream read waits (--hold): ``step``, it answers as soon as there is text (a read a
step); ``share``, as axfs's reads do (axfs/fs/reads.py: a reader back sooner than its
share of 1,000 reads a second waits the rest, 50 ms at most); ``end``, it waits for the
task's end (two reads a task: no streaming at all).

Run: python tools/bench/thin_tree.py MOUNTPOINT --model GGUF [--slots N] [--ctx N]
[--hold step|share|end]; it serves until unmounted.
"""

from __future__ import annotations

import argparse
import errno
import os
import queue
import stat
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mount.cli import quiet_cpu_threads

quiet_cpu_threads()  # llama.cpp's threads sleep when they wait, as in the axfs daemon

from axfs.fs.reads import MAX_HOLD_S, STREAM_READS_PER_S  # noqa: E402
from drivers.base import Piece, Sampling  # noqa: E402
from drivers.llamacpp import LlamaCppDriver  # noqa: E402

TASKS, TRACE = 2, 3
FILES = ("config", "prompt", "stream", "status")


class Task:
    def __init__(self, name: str, ino: int) -> None:
        self.name, self.ino = name, ino
        self.config, self.prompt, self.text = b"", bytearray(), bytearray()
        self.max_tokens, self.done, self.changed = 64, False, trio.Event()
        self.submitted = self.admitted = self.first = self.last_read = 0.0
        self.count = 0

    def status(self) -> bytes:
        queued, first = (self.admitted - self.submitted) * 1000, (self.first - self.submitted) * 1000
        return (f"state {'done' if self.done else 'running'}\nfinish_reason length\n"
                f"generated_tokens {self.count}\nqueued_ms {queued:.1f}\n"
                f"first_token_ms {first:.1f}\n").encode()


class Engine:
    """The driver stepped in one thread; each step's text goes to trio in one call."""

    def __init__(self, driver: LlamaCppDriver, slots: int) -> None:
        self.driver, self.free = driver, list(range(slots))
        self.submitted: queue.SimpleQueue[Task] = queue.SimpleQueue()
        self.token = trio.lowlevel.current_trio_token()

    def run(self) -> None:
        d = self.driver
        last: dict[int, int] = {}  # seq -> its token to feed next
        pos: dict[int, int] = {}
        owner: dict[int, Task] = {}
        waiting: list[Task] = []
        while True:
            if not last and not waiting:
                waiting.append(self.submitted.get())
            while not self.submitted.empty():
                waiting.append(self.submitted.get())
            pieces = [Piece(seq, [tok], pos[seq], True) for seq, tok in last.items()]
            budget = d.shape.n_batch - len(pieces)
            while waiting and self.free:
                tokens = d.tokenize(waiting[0].prompt.decode())
                if len(tokens) > budget:
                    break
                task, seq = waiting.pop(0), self.free.pop()
                d.open_seq(seq, Sampling())
                owner[seq], task.admitted = task, time.time()
                pieces.append(Piece(seq, tokens, 0, True))
                budget -= len(tokens)
            sampled = d.step(pieces)
            now, out = time.time(), []
            for piece in pieces:
                seq, token = piece.seq, sampled[piece.seq]
                task = owner[seq]
                pos[seq] = piece.pos + len(piece.tokens)
                task.first, task.count = task.first or now, task.count + 1
                eog = d.is_eog(token)
                ended = eog or task.count >= task.max_tokens
                out.append((task, b"" if eog else d.piece(token), ended))
                if ended:
                    last.pop(seq, None)
                    d.close_seq(seq)
                    self.free.append(seq)
                    del owner[seq]
                else:
                    last[seq] = token
            self.token.run_sync_soon(publish, out)


def publish(out: list[tuple[Task, bytes, bool]]) -> None:
    for task, text, ended in out:
        task.text += text
        task.done = task.done or ended
        task.changed.set()
        task.changed = trio.Event()


class Thin(pyfuse3.Operations):
    def __init__(self, hold: str) -> None:
        super().__init__()
        self.hold, self.streams = hold, 0
        self.tasks: dict[str, Task] = {}
        self.nodes: dict[int, tuple[str, Task | None]] = {
            pyfuse3.ROOT_INODE: ("root", None), TASKS: ("tasks", None), TRACE: ("trace", None)}
        self.trace: list[bytes] = []
        self.engine: Engine | None = None

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        kind = self.nodes[ino][0]
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o755) if kind in ("root", "tasks", "dir") else (stat.S_IFREG | 0o644)
        a.entry_timeout = a.attr_timeout = 1.0  # as axfs's fixed rows
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        return a

    def _node(self, ino: int) -> tuple[str, Task]:
        kind, task = self.nodes[ino]
        if task is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return kind, task

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        kind, task = self.nodes[parent_inode]
        n = name.decode()
        if kind == "root" and n in ("tasks", "trace"):
            return self._attrs(TASKS if n == "tasks" else TRACE)
        if kind == "tasks" and n in self.tasks:
            return self._attrs(self.tasks[n].ino)
        if kind == "dir" and task is not None and n in FILES:
            return self._attrs(task.ino + 1 + FILES.index(n))
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)  # O_TRUNC of a file not yet written

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        task = Task(name.decode(), 16 + 8 * len(self.tasks))
        self.tasks[task.name] = task
        self.nodes[task.ino] = ("dir", task)
        for k, file in enumerate(FILES):
            self.nodes[task.ino + 1 + k] = (file, task)
        return self._attrs(task.ino)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        self.streams += self.nodes[inode][0] == "stream"
        info = pyfuse3.FileInfo(fh=inode)
        info.direct_io = True
        return info

    async def read(self, fh: int, off: int, size: int) -> bytes:
        kind = self.nodes[fh][0]
        if kind == "trace":
            return b"".join(self.trace)[off:off + size]
        kind, task = self._node(fh)
        if kind != "stream":
            return (task.status() if kind == "status" else task.config)[off:off + size]
        while off >= len(task.text) and not task.done:
            await task.changed.wait()
        if self.hold == "end":
            while not task.done:
                await task.changed.wait()
        elif self.hold == "share" and not task.done:
            with trio.move_on_at(task.last_read + min(MAX_HOLD_S, self.streams / STREAM_READS_PER_S)):
                while not task.done:
                    await task.changed.wait()
        task.last_read = trio.current_time()
        return bytes(task.text[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        kind, task = self._node(fh)
        if kind == "config":
            task.config = buf
            for line in buf.decode().splitlines():
                if line.startswith("max_tokens "):
                    task.max_tokens = int(line.split()[1])
        elif kind == "prompt":
            task.prompt += buf
        return len(buf)

    async def release(self, fh: int) -> None:
        kind, task = self._node(fh)
        self.streams -= kind == "stream"
        if kind == "prompt" and task.prompt and not task.submitted and self.engine:
            task.submitted = time.time()
            stamp = datetime.fromtimestamp(task.submitted, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
            self.trace.append(f"{stamp[:-3]}Z {task.name} 0 submit\n".encode())
            self.engine.submitted.put(task)


async def serve(ops: Thin, driver: LlamaCppDriver, slots: int) -> None:
    ops.engine = Engine(driver, slots)
    threading.Thread(target=ops.engine.run, daemon=True, name="step").start()
    await pyfuse3.main(min_tasks=512, max_tasks=4096)  # as mount/daemon.py


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--ctx", type=int, default=16384)
    p.add_argument("--hold", choices=["step", "share", "end"], default="share")
    p.add_argument("--deterministic", choices=["on", "off"], default="on")
    p.add_argument("--repack", choices=["on", "off"], default="off")
    args = p.parse_args()
    driver = LlamaCppDriver(args.model, n_ctx=args.ctx, n_seq_max=args.slots, repack=args.repack == "on",
                            deterministic=args.deterministic == "on")
    ops = Thin(args.hold)
    pyfuse3.init(ops, str(args.mountpoint), set(pyfuse3.default_options) | {"fsname=thin"})
    try:
        trio.run(serve, ops, driver, args.slots)
    finally:
        pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
