"""The kernel: the tasks, the model, the scheduler and the engine behind the tree.

Every operation the FUSE adapter offers is one method here; each either does what
was asked or raises an ``axfs.errors`` exception whose message says why, after
writing that reason into the trace (and the task's ``error`` file where there is a
task).
"""

from __future__ import annotations

import codecs
import logging
import re
import time

import trio

from axfs.config import TaskConfig
from axfs.engine import Engine
from axfs.errors import AxfsError, BadInput, Busy, Exists, NoSpace, NotFound
from axfs.kv import KVManager
from axfs.persist import Keeper
from axfs.policy import make_policy
from axfs.quota import Limits, Quota
from axfs.replay import Replays
from axfs.scheduler import Scheduler
from axfs.swap import SwapSpace
from axfs.task import State, Task
from axfs.trace import Trace
from drivers.base import Driver

log = logging.getLogger(__name__)

MAX_PROMPT_BYTES = Limits().prompt_bytes  # everyone's default limit
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = frozenset({"new", "latest"})


class Kernel:
    def __init__(self, driver: Driver, trace: Trace | None = None, policy: str = "fair",
                 prefix_cache: bool = True, swap: SwapSpace | None = None,
                 keeper: Keeper | None = None, cache_limit: int | None = None,
                 quota: Quota | None = None) -> None:
        self.driver = driver
        self.model = driver.info
        self.trace = trace or Trace()
        shape = driver.shape
        self.kv = KVManager(shape.n_ctx, shape.n_seq_max, shape.cell_bytes,
                            seq_limit=min(shape.n_ctx, self.model.context_length or shape.n_ctx),
                            prefix_cache=prefix_cache, cache_limit=cache_limit)
        self.scheduler = Scheduler(self.kv, shape.n_batch, make_policy(policy))
        self.engine = Engine(driver, self.scheduler, self.trace, swap)
        self.engine.swap.on_error = lambda task_id, why: self.trace.emit("error", task_id, reason=why)
        self.engine.on_end = self._ended
        self.defaults = TaskConfig(model=self.model.name)
        self.quota = quota or Quota()
        self.quota.usage = lambda uid: int(self.scheduler.policy.users().get(uid, (0.0, 0.0))[1])
        self.tasks: dict[str, Task] = {}
        self._forks: dict[str, list[Task]] = {}  # parent id -> forks waiting for it to end
        self._latest: dict[int, str] = {}
        self._next_id = 1
        self.keeper = keeper
        self.replays = Replays(self)
        self.trace.emit("model_load", model=self.model.name, path=self.model.path,
                        sha256=keeper.model_sha if keeper else "-")

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.keeper is not None:
                nursery.start_soon(self.keeper.run, self)
            await self.engine.run()

    def restore(self) -> None:
        """Bring back the journaled tasks (see axfs.persist)."""
        if self.keeper is not None:
            self.keeper.restore(self)

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close()

    @property
    def model_sha(self) -> str:
        return self.keeper.model_sha if self.keeper else ""

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
        self.quota.track(task)
        self.tasks[name] = task
        return task

    def check_prompt_bytes(self, data: bytes, before: int = 0, uid: int = 0,
                           utf8: codecs.IncrementalDecoder | None = None) -> None:
        """The checks a prompt can fail while it is being written: ``data`` is the newest
        part of it, after ``before`` bytes already checked (``utf8``: the writer's decoder)."""
        self.quota.check_prompt_bytes(uid, before + len(data))
        if b"\0" in data:
            raise BadInput("prompt contains a NUL byte")
        if utf8 is not None:
            held = len(utf8.getstate()[0])
            try:
                utf8.decode(data)
            except UnicodeDecodeError as e:
                raise BadInput(f"prompt is not valid UTF-8 ({e.reason} at byte "
                               f"{before - held + e.start})") from e

    async def submit(self, task: Task, data: bytes) -> None:
        """Queue the draft ``task`` with ``data`` as its prompt."""
        if task.state is not State.DRAFT:
            raise self.reject(task.uid, task, Busy(f"task {task.id} was already submitted"))
        self.check_quota(task.uid, task, task.config)
        await self._queue(task, self._prompt_text(task.uid, task, data))

    async def submit_new(self, uid: int, gid: int, data: bytes) -> Task:
        """``echo PROMPT > tasks/new``: a new task with default parameters, queued."""
        text = self._prompt_text(uid, None, data)
        self.check_quota(uid, None, None)
        task = self.create(uid, gid)
        await self._queue(task, text)
        return task

    def _prompt_text(self, uid: int, task: Task | None, data: bytes) -> str:
        """The prompt as text, with one trailing newline (echo's) dropped; or why not."""
        try:
            self.check_prompt_bytes(data, uid=uid)
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
        self.check_quota(uid, parent, parent.config)
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
            if self.keeper is not None:
                self.keeper.submitted(task)
        return task

    def check_quota(self, uid: int, task: Task | None, config: TaskConfig | None) -> None:
        """Whether ``uid`` may queue one more task (with ``config``; None: the defaults)."""
        try:
            self.quota.check_submit(uid, config)
        except AxfsError as e:
            raise self.reject(uid, task, e) from e

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
        """The engine's word that ``task`` ended: journal it, start the forks waiting for
        it, finish a replay."""
        if self.keeper is not None:
            self.keeper.ended(task)
        self.replays.ended(task)
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
        task.mark("submit", prompt_tokens=len(tokens), max_tokens=task.config.max_tokens)
        if self.keeper is not None:
            self.keeper.submitted(task)
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
            config = task.config.updated(text, self.models)
            self.quota.check_config(task.uid, config)
        except AxfsError as e:
            raise self.reject(task.uid, task, e) from e
        task.config = config
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

    def replay(self, task: Task, text: str) -> None:
        """A command written to replay/ID/ctl (``run``)."""
        try:
            self.replays.control(task, text)
        except AxfsError as e:
            raise self.reject(task.uid, task, e) from e

    def kill(self, task: Task) -> None:
        if task.finished:
            return
        self.trace.emit("kill", task.id, task.uid, state=task.state, tokens=task.num_generated)
        self.engine.end(task, State.KILLED, "killed")

    def remove(self, task: Task, reason: str = "rm") -> None:
        """``rm -r tasks/ID``: kill the task if it still runs, then forget it."""
        self.kill(task)
        self.tasks.pop(task.id, None)
        if self._latest.get(task.uid) == task.id:
            del self._latest[task.uid]
        if self.keeper is not None:
            self.keeper.removed(task)
        self.trace.emit("remove", task.id, task.uid, reason=reason)

    # -- restoring (axfs.persist) ---------------------------------------------------

    def adopt(self, task: Task) -> None:
        """Put a task read back from the journal into the tree."""
        self.tasks[task.id] = task
        if not task.finished:
            self.quota.track(task)  # counts toward its user's limits
        latest = self.latest(task.uid)
        if latest is None or latest.submitted_at <= task.submitted_at:
            self._latest[task.uid] = task.id
        if task.id.isdigit():
            self._next_id = max(self._next_id, int(task.id) + 1)

    def resume(self, task: Task, generated: list[int]) -> None:
        """Queue an unfinished journaled task, with the tokens it had generated: its
        text is rebuilt from them and it runs on from there."""
        for token in generated:
            if task.finished:
                break
            task.add_token(token, self.driver.piece(token), self.driver.is_eog(token),
                           limit_reached=False)
        self.trace.emit("resume", task.id, task.uid, tokens=len(generated))
        if task.finished:
            self.engine.end(task, task.state, task.finish_reason)
            return
        task.state = State.QUEUED
        task.waiting_since = time.time()
        task.stepwise_until = task.num_history - 1
        self.engine.add(task)

    def resume_fork(self, task: Task) -> None:
        parent = self.tasks.get(task.parent)
        if parent is None:
            self.engine.end(task, State.FAILED, "error",
                            f"task {task.parent}, which this one continues, is gone")
        elif parent.finished:
            self._start_fork(task, parent)
        else:
            self._forks.setdefault(parent.id, []).append(task)

    def reject(self, uid: int, task: Task | None, error: AxfsError) -> AxfsError:
        """Record why a request was refused (trace, task error file, users/UID) and return
        it to raise."""
        self.trace.emit("reject", task.id if task else "-", uid, reason=str(error))
        self.quota.refused(uid, task.id if task else "-", str(error))
        if task is not None:
            task.error = str(error)
            task.notify()
        return error
