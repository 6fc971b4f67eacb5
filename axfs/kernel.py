"""The kernel: the tasks, the model, the scheduler and the engine behind the tree.

Every operation the FUSE adapter offers is one method here; each either does what
was asked or raises an ``axfs.errors`` exception whose message says why, after
writing that reason into the trace (and the task's ``error`` file where there is a
task).
"""

from __future__ import annotations

import logging
import re

import trio

from axfs.config import TaskConfig
from axfs.engine import Engine
from axfs.errors import AxfsError, BadInput, Busy, Exists, NoSpace, NotFound, TooLarge
from axfs.kv import KVManager
from axfs.policy import make_policy
from axfs.scheduler import Scheduler
from axfs.swap import SwapSpace
from axfs.task import State, Task
from axfs.trace import Trace
from drivers.base import Driver

log = logging.getLogger(__name__)

MAX_PROMPT_BYTES = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = frozenset({"new", "latest"})


class Kernel:
    def __init__(self, driver: Driver, trace: Trace | None = None, policy: str = "fair",
                 prefix_cache: bool = True, swap: SwapSpace | None = None) -> None:
        self.driver = driver
        self.model = driver.info
        self.trace = trace or Trace()
        shape = driver.shape
        self.kv = KVManager(shape.n_ctx, shape.n_seq_max, shape.cell_bytes,
                            seq_limit=min(shape.n_ctx, self.model.context_length or shape.n_ctx),
                            prefix_cache=prefix_cache)
        self.scheduler = Scheduler(self.kv, shape.n_batch, make_policy(policy))
        self.engine = Engine(driver, self.scheduler, self.trace, swap)
        self.engine.on_end = self._ended
        self.defaults = TaskConfig(model=self.model.name)
        self.tasks: dict[str, Task] = {}
        self._forks: dict[str, list[Task]] = {}  # parent id -> forks waiting for it to end
        self._latest: dict[int, str] = {}
        self._next_id = 1
        self.trace.emit("model_load", model=self.model.name, path=self.model.path)

    async def run(self) -> None:
        await self.engine.run()

    @property
    def models(self) -> set[str]:
        return {self.model.name}

    # -- looking up ------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound(f"no task {task_id}")
        return task

    def latest(self, uid: int) -> Task | None:
        task_id = self._latest.get(uid)
        return self.tasks.get(task_id) if task_id else None

    # -- making tasks ----------------------------------------------------------------

    def create(self, uid: int, gid: int, name: str | None = None) -> Task:
        """A draft task (``mkdir tasks/NAME``, or the first half of ``tasks/new``)."""
        if name is None:
            while str(self._next_id) in self.tasks:
                self._next_id += 1
            name = str(self._next_id)
            self._next_id += 1
        elif name in RESERVED_NAMES or not _NAME.fullmatch(name):
            raise self.reject(uid, None, BadInput(
                f"bad task name {name!r}: 1-64 of A-Z a-z 0-9 . _ - (not new or latest)"))
        elif name in self.tasks:
            raise Exists(f"task {name} exists")
        task = Task(name, uid, gid, self.defaults.copy())
        self.tasks[name] = task
        return task

    @staticmethod
    def check_prompt_bytes(data: bytes, before: int = 0) -> None:
        """The checks a prompt can fail while it is being written: ``data`` is the newest
        part of it, after ``before`` bytes already checked."""
        if before + len(data) > MAX_PROMPT_BYTES:
            raise TooLarge(f"prompt is over {MAX_PROMPT_BYTES} bytes")
        if b"\0" in data:
            raise BadInput("prompt contains a NUL byte")

    async def submit(self, task: Task, data: bytes) -> None:
        """Queue the draft ``task`` with ``data`` as its prompt."""
        if task.state is not State.DRAFT:
            raise self.reject(task.uid, task, Busy(f"task {task.id} was already submitted"))
        await self._queue(task, self._prompt_text(task.uid, task, data))

    async def submit_new(self, uid: int, gid: int, data: bytes) -> Task:
        """``echo PROMPT > tasks/new``: a new task with default parameters, queued."""
        text = self._prompt_text(uid, None, data)
        task = self.create(uid, gid)
        await self._queue(task, text)
        return task

    def _prompt_text(self, uid: int, task: Task | None, data: bytes) -> str:
        """The prompt as text, with one trailing newline (echo's) dropped; or why not."""
        try:
            self.check_prompt_bytes(data)
            text = data.decode("utf-8").removesuffix("\n")
        except UnicodeDecodeError as e:
            raise self.reject(uid, task, BadInput(
                f"prompt is not valid UTF-8 ({e.reason} at byte {e.start})")) from e
        except AxfsError as e:
            raise self.reject(uid, task, e) from e
        if not text.strip():
            raise self.reject(uid, task, BadInput("prompt is empty"))
        return text

    async def fork(self, parent: Task, uid: int, gid: int, data: bytes) -> Task:
        """``echo TEXT > tasks/ID/fork``: a new task continuing ``parent``'s text with TEXT.

        Its context is the parent's prompt, what the parent generated and TEXT; it shares
        the parent's KV (the prefix cache finds it) and its parameters. A fork of a task
        that has not ended waits for it.
        """
        self.check_forkable(parent, uid)
        text = self._prompt_text(uid, parent, data)
        tokens = await trio.to_thread.run_sync(lambda: self.driver.tokenize(text, bos=False))
        task = self.create(uid, gid)
        task.config = parent.config.copy()
        task.parent = parent.id
        task.follow_up = tokens
        task.prompt = text
        self._latest[uid] = task.id
        if parent.finished:
            self._start_fork(task, parent)
        else:
            task.submit(text, [])
            self._forks.setdefault(parent.id, []).append(task)
            self.trace.emit("fork", task.id, uid, parent=parent.id, waiting="yes")
        return task

    def check_forkable(self, parent: Task, uid: int) -> None:
        if parent.state is State.DRAFT:
            raise self.reject(uid, parent, Busy(
                f"task {parent.id} has no prompt yet: there is nothing to fork"))

    def _start_fork(self, task: Task, parent: Task) -> None:
        if parent.state is State.FAILED:
            error = f"task {parent.id}, which this one continues, failed: {parent.error}"
            self.trace.emit("error", task.id, task.uid, reason=error)
            self.engine.end(task, State.FAILED, "error", error)
            return
        task.submit(task.prompt, parent.context() + task.follow_up)
        self.trace.emit("fork", task.id, task.uid, parent=parent.id,
                        context_tokens=len(task.prompt_tokens))
        self._enqueue(task)

    def _ended(self, task: Task) -> None:
        """The engine's word that ``task`` ended: start the forks waiting for it."""
        for child in self._forks.pop(task.id, []):
            if not child.finished:
                self._start_fork(child, task)

    async def _queue(self, task: Task, text: str) -> None:
        tokens = await trio.to_thread.run_sync(self.driver.tokenize, text)
        task.submit(text, tokens)
        self._latest[task.uid] = task.id
        self._enqueue(task)

    def _enqueue(self, task: Task) -> None:
        tokens = task.prompt_tokens
        self.trace.emit("submit", task.id, task.uid, prompt_tokens=len(tokens),
                        max_tokens=task.config.max_tokens, model=task.config.model)
        if len(tokens) >= self.kv.seq_limit:
            error = NoSpace(f"prompt is {len(tokens)} tokens; a task's context holds "
                            f"{self.kv.seq_limit} tokens with room for at least one more")
            self.trace.emit("error", task.id, task.uid, reason=str(error))
            self.engine.end(task, State.FAILED, "error", str(error))
            return
        self.engine.add(task)

    # -- changing tasks --------------------------------------------------------------

    def configure(self, task: Task, text: str) -> None:
        if task.state is not State.DRAFT and task.state is not State.QUEUED:
            raise self.reject(task.uid, task, Busy(
                f"task {task.id} is {task.state}: config is writable until the task starts"))
        try:
            task.config = task.config.updated(text, self.models)
        except BadInput as e:
            raise self.reject(task.uid, task, e) from e
        if task.state is State.QUEUED:
            task.config.fix_seed()
        self.trace.emit("config", task.id, task.uid, text=text.strip())

    def control(self, task: Task, text: str) -> None:
        """Apply one ``ctl`` command: ``kill`` or ``priority N``."""
        words = text.split()
        if words == ["kill"]:
            self.kill(task)
            return
        if len(words) == 2 and words[0] == "priority":
            try:
                task.config = task.config.updated(f"priority {words[1]}", self.models)
            except BadInput as e:
                raise self.reject(task.uid, task, e) from e
            self.trace.emit("priority", task.id, task.uid, priority=task.config.priority)
            return
        raise self.reject(task.uid, task, BadInput(
            f"ctl: cannot parse {text.strip()[:60]!r} (commands: kill, priority N)"))

    def kill(self, task: Task) -> None:
        if task.finished:
            return
        self.trace.emit("kill", task.id, task.uid, state=task.state, tokens=task.num_generated)
        self.engine.end(task, State.KILLED, "killed")

    def remove(self, task: Task) -> None:
        """``rm -r tasks/ID``: kill the task if it still runs, then forget it."""
        self.kill(task)
        del self.tasks[task.id]
        if self._latest.get(task.uid) == task.id:
            del self._latest[task.uid]
        self.trace.emit("remove", task.id, task.uid)

    def reject(self, uid: int, task: Task | None, error: AxfsError) -> AxfsError:
        """Record why a request was refused (trace, task error file) and return it to raise."""
        self.trace.emit("reject", task.id if task else "-", uid, reason=str(error))
        if task is not None:
            task.error = str(error)
            task.notify()
        return error
