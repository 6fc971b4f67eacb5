"""Keeping tasks across restarts: the kernel's side of the journal.

The keeper records what the kernel accepts and what the engine produces (see
axfs.journal for the format and when it reaches the disk), brings every task back
when a tree is mounted on the same state directory, and drops finished tasks past
the retention limits (from the tree and, by compaction, from the journal).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from axfs.errors import NotRecorded
from axfs.journal import Journal, end_record, make_task, snapshot, task_record
from axfs.models import Registry
from axfs.task import State, Task
from axfs.trace import Event, Trace
from drivers.files import open_regular

log = logging.getLogger(__name__)

# A submission's record is written and fsync'ed in the trio thread when the last commit
# took less than this (a fast disk: 0.1 ms here), else in a worker thread, so the tree
# goes on answering while a slow disk writes (2 to 6 ms on another machine). Handing it
# to a thread and back cost 0.4 to 0.9 ms a submission in a 64-task burst here.
INLINE_COMMIT_S = 0.001
COMPACT_MIN_BYTES = 16 << 20  # compact a journal grown past this and twice its last size


@dataclass(slots=True)
class Retention:
    """How many finished tasks are kept, and for how long."""

    keep_tasks: int = 1000
    keep_seconds: float = 7 * 86400.0


class Kept(Protocol):
    """What the keeper needs of the tree it keeps (the kernel): its tasks, the way to
    remove one, its models (which is the default) and its trace."""

    trace: Trace
    tasks: dict[str, Task]
    registry: Registry

    def remove(self, task: Task, reason: str = "rm") -> None: ...


class Keeper:
    def __init__(self, journal: Journal, model_sha: str, retention: Retention | None = None) -> None:
        self.journal = journal
        self.model_sha = model_sha
        self.retention = retention or Retention()
        self._written: dict[str, int] = {}  # task id -> generated tokens journaled
        self._text_written: dict[str, int] = {}  # a remote task's id -> bytes of its text journaled
        self._ended: list[Task] = []
        self._active: dict[str, Task] = {}  # submitted, not yet ended
        self._compacted_size = 0
        self.error = ""  # the last write error, shown in trace and log
        self.num_errors = 0
        self._trace: Trace | None = None  # the tree's, once it is kept (``load``, ``run``)

    # -- recording -----------------------------------------------------------------

    def submitted(self, task: Task, durable: bool = True) -> None:
        """Record a submission (or a queued task's new config) on disk before the write
        that made it returns; NotRecorded, with the disk's errno, if it cannot be. Not
        ``durable``: with the next write (a fork's context, once its parent has ended)."""
        record = self._submission(task)
        if durable:
            self._commit(record)
        else:
            self.journal.append(record)
        self._accept(task)

    async def submitted_off_thread(self, task: Task) -> None:
        """``submitted``, its write and fsync in a worker thread where the disk is slow
        (``INLINE_COMMIT_S``): the tree goes on answering and stepping while the disk
        writes, and the write that submitted still returns only once the record is on
        disk."""
        record = self._submission(task)
        try:
            if self.journal.commit_s < INLINE_COMMIT_S:
                self.journal.commit(record)
            else:
                await trio.to_thread.run_sync(self.journal.commit, record)
        except OSError as e:
            raise self._refusal(e) from e
        self._recovered()
        self._accept(task)
        if task.finished:  # killed while its record was written: its end is journaled too
            self.ended(task)

    @staticmethod
    def _submission(task: Task) -> dict[str, Any]:
        record = task_record(task, task.model_sha)
        if task.output_tokens:  # a resumed task: what it generated before stays its own
            record["generated"] = list(task.output_tokens)
            if task.remote:
                record["text"] = bytes(task.output)
        return record

    def _accept(self, task: Task) -> None:
        self._written[task.id] = len(task.output_tokens)
        self._text_written[task.id] = len(task.output)
        self._active[task.id] = task

    def ended(self, task: Task) -> None:
        if task.id in self._active:
            self._ended.append(task)

    def removed(self, task: Task, durable: bool = False) -> None:
        """Record a removal: on disk before ``rm`` returns with ``durable`` (NotRecorded if
        it cannot be, and the task stays), else with the next write (retention)."""
        record = {"t": "rm", "id": task.id}
        if durable:
            self._commit(record)
        else:
            self.journal.append(record)
        self._forget(task)

    def sync(self) -> None:
        """Write and fsync what is waiting (ends: a kill) now; NotRecorded if it cannot be."""
        self._collect()
        try:
            self.journal.flush(sync=True)
        except OSError as e:
            self._failed(e)
            raise NotRecorded(f"{self.error}: it is not on disk", e.errno or errno.EIO) from e

    def check(self, size: int) -> None:
        """While writes fail, whether a submission of ``size`` bytes could be written now
        (as many bytes are written, fsync'ed and cut off again); NotRecorded if not. Lets a
        prompt be refused at its first write, which a shell reports, rather than at
        close, which it does not."""
        if not self.error:
            return
        try:
            self.journal.probe(2 * size + 1024)  # the record has its text and its tokens
        except OSError as e:
            raise self._refusal(e) from e
        self._recovered()

    def _commit(self, record: dict[str, Any]) -> None:
        try:
            self.journal.commit(record)
        except OSError as e:
            raise self._refusal(e) from e
        self._recovered()

    def _refusal(self, e: OSError) -> NotRecorded:
        """A write failed: noted (trace, log, sched), and the refusal to raise."""
        self._failed(e)
        return NotRecorded(f"{self.error}: the tree refuses work until it can write",
                           e.errno or errno.EIO)

    def _recovered(self) -> None:
        if self.error:
            log.warning("journal written again (%s)", self.journal.path)
            if self._trace is not None:
                self._trace.emit(Event.JOURNAL_OK, bytes=self.journal.bytes_written)
            self.error = ""

    @property
    def state(self) -> str:
        """sched's ``journal`` line: ok, or refusing work and why."""
        return f"refusing work ({self.error})" if self.error else "ok"

    def _collect(self) -> None:
        """Move new tokens and ends into the journal's buffer."""
        for task in self._active.values():
            done = self._written.get(task.id, 0)
            if len(task.output_tokens) > done:
                record: dict[str, Any] = {"t": "gen", "id": task.id, "k": task.output_tokens[done:]}
                if task.remote:  # its tokens are not known: its text is kept with them
                    record["x"] = bytes(task.output[self._text_written.get(task.id, 0):])
                    self._text_written[task.id] = len(task.output)
                self.journal.append(record)
                self._written[task.id] = len(task.output_tokens)
        ended, self._ended = self._ended, []
        for task in ended:
            self.journal.append(end_record(task))
            self._forget(task)

    def _forget(self, task: Task) -> None:
        self._active.pop(task.id, None)
        self._written.pop(task.id, None)
        self._text_written.pop(task.id, None)

    def _failed(self, e: OSError) -> None:
        self.num_errors += 1
        message = f"journal write failed: {e.strerror or e}"
        if message != self.error:
            log.error("%s (%s)", message, self.journal.path)
            if self._trace is not None:
                self._trace.emit(Event.JOURNAL_ERROR, reason=message)
        self.error = message

    async def run(self, kept: Kept) -> None:
        """Every ``interval``: journal new tokens and ends, fsync, apply retention."""
        self._trace = kept.trace
        last_retention = time.monotonic()
        while True:
            await trio.sleep(self.journal.interval)
            self._collect()
            try:
                if await trio.to_thread.run_sync(self.journal.flush, True):
                    self._recovered()  # something was written: the disk has room again
            except OSError as e:
                self._failed(e)
            if time.monotonic() - last_retention > 60:
                last_retention = time.monotonic()
                self.retain(kept)

    def close(self) -> None:
        self._collect()
        try:
            self.journal.close()
        except OSError as e:
            self._failed(e)

    # -- retention and compaction ----------------------------------------------------

    def retain(self, kept: Kept) -> None:
        """Drop finished tasks past the count or age limits; compact a grown journal."""
        done = sorted((t for t in kept.tasks.values() if t.finished), key=lambda t: t.finished_at)
        cutoff = time.time() - self.retention.keep_seconds
        extra = max(0, len(done) - self.retention.keep_tasks)
        for i, task in enumerate(done):
            if i < extra or task.finished_at < cutoff:
                kept.remove(task, reason="retention")
        size = self.journal.bytes_written + self._compacted_size
        if size > max(COMPACT_MIN_BYTES, 2 * self._compacted_size):
            self.compact(kept)

    def compact(self, kept: Kept) -> None:
        self._collect()
        default = kept.registry.entries.get(kept.registry.default)
        records = [{"t": "model", "name": kept.registry.default,
                    "path": default.path if default else "", "sha256": self.model_sha,
                    "at": time.time()}]
        records += [snapshot(t, self.model_sha) for t in kept.tasks.values()
                    if t.state is not State.DRAFT]
        try:
            self.journal.compact(records)
        except OSError as e:
            self._failed(e)
            return
        for task in kept.tasks.values():
            if task.id in self._written:
                self._written[task.id] = len(task.output_tokens)
                self._text_written[task.id] = len(task.output)
        self._compacted_size = self.journal.path.stat().st_size
        self.journal.bytes_written = 0

    # -- restoring ---------------------------------------------------------------------

    def load(self, trace: Trace) -> tuple[list[tuple[Task, list[int]]], int]:
        """Every journaled task, oldest first, with the tokens it generated, and how many
        records were read. Unfinished ones are kept from here on (axfs.restore decides
        what each does next)."""
        self._trace = trace
        loaded = self.journal.load()
        if loaded.torn_at is not None:
            trace.emit(Event.JOURNAL_TORN, offset=loaded.torn_at, bytes=loaded.torn_bytes)
        restored = [(make_task(e), e.tokens) for e in loaded.tasks.values()]
        restored.sort(key=lambda r: (r[0].submitted_at, r[0].id))
        for task, generated in restored:
            if not task.finished:
                self._active[task.id] = task
                self._written[task.id] = len(generated)
                self._text_written[task.id] = len(task.output)
        return restored, loaded.records


def file_sha256(path: Path, state_dir: Path) -> str:
    """The sha256 of a model file, remembered in STATE_DIR/sha256.json by path, size and
    modification time so that a mount does not read the whole file again. ValueError
    when it is not a regular file."""
    cache_path = state_dir / "sha256.json"
    with open(open_regular(path), "rb") as f:  # not a FIFO or a device (drivers.files)
        st = os.fstat(f.fileno())
        key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        if isinstance(cache, dict) and isinstance(cache.get(key), str):
            return str(cache[key])
        digest = hashlib.sha256()
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    sha = digest.hexdigest()
    cache = {k: v for k, v in (cache if isinstance(cache, dict) else {}).items()
             if not k.startswith(f"{path.resolve()}:")}
    cache[key] = sha
    with contextlib.suppress(OSError):
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    return sha
