"""The journal: every accepted task, what it generated and how it ended, on disk.

One append-only file, ``STATE_DIR/journal.msgpack``, a stream of msgpack maps:

- ``{"t": "model", "name", "path", "sha256", "at"}`` when a model is loaded;
- ``{"t": "task", ...}`` when a task is submitted: id, owner, parameters, prompt text
  and tokens, parent, the model's sha256 (see ``task_record``);
- ``{"t": "gen", "id", "k": [token ids], "p": records}`` the tokens a task generated
  since the last such record, written at most ``interval`` seconds after they were
  generated; ``p``, for a task run with logprobs, their records (axfs.tokens), as bytes;
  a remote task's, whose ids are not known (-1 each), with ``"x"``: the bytes of its
  text they made;
- ``{"t": "end", "id", "state", "reason", "error", "text", ...}`` when it ends, with the
  text of its stream and its timeline;
- ``{"t": "rm", "id"}`` when it is removed.

When records reach the disk: a submission is written and fsync'ed before the write
that submitted it returns (``commit``), so an accepted task survives a power failure,
and one that cannot be written is refused and leaves nothing in the file. Submissions
that arrive together share one write and one fsync (group commit, as databases do: the
first caller writes every record queued by then while the others wait for it); generated
tokens and ends are written every ``interval`` seconds (default 1) and fsync'ed then.
A power failure loses at most that last second of tokens and ends, which a restart
computes again (the tasks run on from what was kept). A crash of the daemon alone
loses nothing written, since written data is in the kernel's page cache.

A file whose last record was cut mid-write (a torn tail) loads everything before it;
the tail is reported (``journal_torn`` in the trace, and the log) and cut off.
Compaction rewrites the file with one ``task`` record per task kept, written to a new
file that replaces the old one atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from axfs import timeline
from axfs.config import TaskConfig
from axfs.task import State, Task
from axfs.timeline import Finish

log = logging.getLogger(__name__)

NAME = "journal.msgpack"
TIMES = ("created_at", "submitted_at", "started_at", "first_token_at", "finished_at")


def task_record(task: Task, model_sha: str) -> dict[str, Any]:
    """What a submission records: enough to run the task again from the start."""
    return {
        "t": "task", "id": task.id, "uid": task.uid, "gid": task.gid,
        "config": dataclasses.asdict(task.config), "prompt": task.prompt,
        "tokens": task.prompt_tokens, "parent": task.parent, "follow_up": task.follow_up,
        "model_sha": model_sha, "deterministic": task.deterministic,
        **{k: getattr(task, k) for k in TIMES},
        **({"model_prompt": task.model_prompt} if task.model_prompt else {}),
        **({"turns": [list(turn) for turn in task.turns]} if task.turns else {}),
    }


def end_record(task: Task) -> dict[str, Any]:
    return {
        "t": "end", "id": task.id, "state": task.state.value, "reason": task.finish_reason,
        "error": task.error, "text": bytes(task.output), "preempted": task.num_preempted,
        "processed": task.num_processed, "waited": task.waited_s, "reused": task.prefix_reused,
        "timeline": [e.record() for e in task.timeline], "deterministic": task.deterministic,
        **{k: getattr(task, k) for k in TIMES},
    }


@dataclass(slots=True)
class Entry:
    """One task as the journal knows it."""

    record: dict[str, Any]
    tokens: list[int] = field(default_factory=list)  # generated so far
    text: bytearray = field(default_factory=bytearray)  # a remote task's, so far
    records: bytearray = field(default_factory=bytearray)  # their records (logprobs)
    end: dict[str, Any] | None = None


@dataclass(slots=True)
class Loaded:
    tasks: dict[str, Entry]
    models: list[dict[str, Any]]
    records: int
    torn_at: int | None = None  # byte offset of a torn tail, if there was one
    torn_bytes: int = 0


def make_task(entry: Entry) -> Task:
    """A Task from its journal entry: its parameters, prompt, output and times (the
    caller decides what an unfinished one does next)."""
    r = entry.record
    config = TaskConfig(**r["config"])
    task = Task(r["id"], r["uid"], r["gid"], config)
    task.prompt = r["prompt"]
    task.prompt_tokens = list(r["tokens"])
    task.parent = r.get("parent", "")
    task.follow_up = list(r.get("follow_up", []))
    task.model_prompt = r.get("model_prompt", "")
    task.turns = [(role, said) for role, said in r.get("turns", [])]
    task.output = bytearray(entry.text)  # a remote task's text so far (a local one's is rebuilt)
    task.remote = bool(entry.text)
    task.model_sha = r.get("model_sha", "")
    task.records = bytearray(entry.records)  # an unfinished task's: cut as it resumes
    task.deterministic = r.get("deterministic", False)
    for k in TIMES:
        setattr(task, k, r.get(k, 0.0))
    task.state = State.QUEUED
    end = entry.end
    if end is not None:
        task.output_tokens = list(entry.tokens)
        task.output = bytearray(end["text"])
        task.state = State(end["state"])
        task.finish_reason = Finish(end["reason"])
        task.error = end["error"]
        task.num_preempted = end.get("preempted", 0)
        task.num_processed = end.get("processed", 0)
        task.waited_s = end.get("waited", 0.0)
        task.prefix_reused = end.get("reused", 0)
        task.deterministic = end.get("deterministic", False)
        task.timeline = [timeline.entry(e) for e in end.get("timeline", [])]
        for k in TIMES:
            setattr(task, k, end.get(k, getattr(task, k)))
    return task


@dataclass(slots=True)
class _Commit:
    """A record waiting to be written by ``Journal.commit``, and how that went."""

    data: bytes
    done: bool = False
    error: OSError | None = None


class Journal:
    def __init__(self, directory: Path, interval: float = 1.0) -> None:
        self.path = directory / NAME
        self.interval = interval
        self._buf = bytearray()
        self._fd: int | None = None
        self._lock = threading.Lock()  # the buffer: appended in the trio thread
        self._write_lock = threading.RLock()  # the file: flushed from worker threads too
        self._group = threading.Condition()  # commits waiting to be written together
        self._queued: list[_Commit] = []
        self._leading = False  # a commit is writing a group now
        self.bytes_written = 0
        self.records = 0
        self.syncs = 0  # fsyncs of committed records
        self.commit_s = 1.0  # how long the last commit's write and fsync took

    # -- reading -----------------------------------------------------------------

    def load(self) -> Loaded:
        """Read the journal; a torn tail is cut off (and reported in the result)."""
        loaded = Loaded(tasks={}, models=[], records=0)
        if not self.path.exists():
            return loaded
        size = self.path.stat().st_size
        good = 0
        with open(self.path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
            try:
                for rec in self._records(unpacker):
                    self._apply(loaded, rec)
                    loaded.records += 1
                    good = unpacker.tell()
            except (ValueError, msgpack.UnpackException, KeyError, TypeError) as e:
                log.warning("journal: bad record at byte %d: %s", good, e)
            else:
                good = unpacker.tell()
        if good < size:
            loaded.torn_at, loaded.torn_bytes = good, size - good
            log.warning("journal %s: torn tail of %d bytes at byte %d, cut off", self.path,
                        size - good, good)
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        return loaded

    @staticmethod
    def _records(unpacker: msgpack.Unpacker) -> Iterator[dict[str, Any]]:
        for rec in unpacker:
            if not isinstance(rec, dict) or "t" not in rec:
                raise ValueError("not a journal record")
            yield rec

    @staticmethod
    def _apply(loaded: Loaded, rec: dict[str, Any]) -> None:
        kind = rec["t"]
        if kind == "model":
            loaded.models.append(rec)
        elif kind == "task":
            loaded.tasks[rec["id"]] = Entry(record=rec, tokens=list(rec.get("generated", [])),
                                            text=bytearray(rec.get("text", b"")),
                                            records=bytearray(rec.get("records", b"")),
                                            end=rec.get("end"))
        elif kind == "gen":
            entry = loaded.tasks.get(rec["id"])
            if entry is not None:
                entry.tokens += rec["k"]
                entry.text += rec.get("x", b"")
                entry.records += rec.get("p", b"")
        elif kind == "end":
            entry = loaded.tasks.get(rec["id"])
            if entry is not None:
                entry.end = rec
        elif kind == "rm":
            loaded.tasks.pop(rec["id"], None)

    # -- writing -----------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, record: dict[str, Any]) -> None:
        """Add a record to the buffer; ``flush`` writes it."""
        data = msgpack.packb(record, use_bin_type=True)
        with self._lock:
            self._buf += data
        self.records += 1

    def commit(self, record: dict[str, Any]) -> None:
        """Write ``record`` after what the buffer holds and fsync it; OSError if either
        cannot be done, and then the file ends as it did before the record. Called from
        several threads at once, the records queued meanwhile go in one write and fsync
        (and fail together: none of them stays in the file)."""
        mine = _Commit(msgpack.packb(record, use_bin_type=True))
        with self._group:
            self._queued.append(mine)
            while self._leading and not mine.done:
                self._group.wait()
            if mine.done:
                if mine.error is not None:
                    raise mine.error
                return
            self._leading = True
            group, self._queued = self._queued, []
        error: OSError | None = None
        start = time.perf_counter()
        try:
            data = b"".join(c.data for c in group)
            with self._write_lock:
                self._write_synced(data)
                self.commit_s = time.perf_counter() - start
                self.bytes_written += len(data)
                self.records += len(group)
                self.syncs += 1
        except OSError as e:
            error = e
        with self._group:
            for c in group:
                c.done, c.error = True, error
            self._leading = False
            self._group.notify_all()
        if error is not None:
            raise error

    def probe(self, size: int) -> None:
        """Whether a record of about ``size`` bytes can be written and fsync'ed now: one is,
        then cut off again. OSError if not."""
        with self._write_lock:
            start = self._write_synced(bytes(size))
            assert self._fd is not None
            os.ftruncate(self._fd, start)

    def _write_synced(self, data: bytes) -> int:
        """With the write lock held: write the buffer, then ``data`` at the file's end, and
        fsync; the offset ``data`` starts at. OSError if it cannot be done, and then no
        part of ``data`` stays in the file."""
        self.flush(sync=False)
        assert self._fd is not None
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:  # a short write is followed by one that fails (ENOSPC)
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise
        return start

    def flush(self, sync: bool) -> int:
        """Write the buffer to the file (and fsync it with ``sync``); the bytes written.
        Raises OSError."""
        with self._write_lock:
            if self._fd is None:
                self.open()
            assert self._fd is not None
            with self._lock:
                data = bytes(self._buf)
                del self._buf[:]
            written = 0
            try:
                if data:
                    written = os.write(self._fd, data)
                    self.bytes_written += written
                if sync:
                    os.fsync(self._fd)
            finally:
                if written < len(data):  # kept, to be written when the disk has room
                    with self._lock:
                        self._buf[:0] = data[written:]
            return written

    def compact(self, records: list[dict[str, Any]]) -> None:
        """Replace the file with ``records`` (atomically: new file, fsync, rename)."""
        with self._write_lock:
            self._compact(records)

    def _compact(self, records: list[dict[str, Any]]) -> None:
        self.flush(sync=False)
        tmp = self.path.with_suffix(".new")
        with open(tmp, "wb") as f:
            for rec in records:
                f.write(msgpack.packb(rec, use_bin_type=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._fd is not None:
            os.close(self._fd)
        self.open()

    def close(self) -> None:
        try:
            self.flush(sync=True)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def snapshot(task: Task, model_sha: str) -> dict[str, Any]:
    """One record holding a task whole, for compaction."""
    rec = task_record(task, task.model_sha or model_sha)
    rec["generated"] = list(task.output_tokens)
    if task.remote:
        rec["text"] = bytes(task.output)
    if task.records:
        rec["records"] = bytes(task.records)
    if task.finished:
        rec["end"] = end_record(task)
    return rec
