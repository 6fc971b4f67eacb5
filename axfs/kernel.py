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
from collections.abc import Callable
from pathlib import Path

import trio

from axfs.config import TaskConfig, parse_setting
from axfs.engine import Engine
from axfs.errors import AxfsError, BadInput, Busy, Exists, NoSpace, NotFound, Unavailable
from axfs.kv import KVManager
from axfs.modelctl import ModelControl
from axfs.models import ModelEntry, Registry
from axfs.persist import Keeper
from axfs.quota import Limits, Quota
from axfs.remote import RemoteRuntime
from axfs.replay import Replays
from axfs.runtime import LocalOptions, LocalRuntime, Runtime
from axfs.scheduler import Scheduler
from axfs.swap import SwapSpace
from axfs.task import State, Task
from axfs.trace import Trace
from drivers import chat
from drivers.base import Driver, DriverError
from drivers.gguf import GgufInfo

Loader = Callable[[ModelEntry], Driver]  # loads a local model (in a worker thread)

log = logging.getLogger(__name__)

MAX_PROMPT_BYTES = Limits().prompt_bytes  # everyone's default limit
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = frozenset({"new", "latest"})


class Kernel(ModelControl):
    """The tasks and the models behind the tree.

    ``driver`` is the default model, loaded; others are loaded on demand by ``loader``
    (a local GGUF) or reached through their endpoints (remote), each in a runtime of its
    own (axfs.runtime), and unloaded after ``idle_unload_s`` without work (0: never).
    """

    def __init__(self, driver: Driver | None, trace: Trace | None = None, policy: str = "fair",
                 prefix_cache: bool = True, swap: SwapSpace | None = None,
                 keeper: Keeper | None = None, cache_limit: int | None = None,
                 quota: Quota | None = None, registry: Registry | None = None,
                 loader: Loader | None = None, sha_of: Callable[[str], str] | None = None,
                 idle_unload_s: float = 0.0, copy_dir: Path | None = None,
                 overlap: bool | None = None) -> None:
        self.trace = trace or Trace()
        self.keeper = keeper
        self.registry = registry or Registry()
        self.loader = loader
        self.sha_of = sha_of or (lambda path: "")
        self.idle_unload_s = idle_unload_s
        self.copy_dir = copy_dir  # where `cp FILE models/` puts its copies
        self.options = LocalOptions(policy, prefix_cache, cache_limit,
                                    swap.mem_limit if swap else 512 << 20, overlap)
        self._swap_dir = swap.directory if swap else None
        self.runtimes: dict[str, Runtime] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._loading: dict[str, trio.Event] = {}
        self._load_errors: dict[str, str] = {}
        self._infos: dict[str, GgufInfo | str] = {}
        self._deferred: dict[str, list[Callable[[Runtime], None]]] = {}  # until it loads
        self._nursery: trio.Nursery | None = None
        self._started = trio.Event()  # run() has its nursery: models can be loaded
        if driver is not None:
            name = driver.info.name
            if name not in self.registry.entries:
                self.registry.add(ModelEntry(name, path=driver.info.path))
            self.registry.default = name
            sha = keeper.model_sha if keeper else ""
            self._attach(LocalRuntime(name, driver, self.trace, self.options, swap, sha))
            self.trace.emit("model_load", model=name, path=driver.info.path, sha256=sha or "-")
        self.defaults = TaskConfig(model=self.registry.default)
        self.quota = quota or Quota()
        self.quota.usage = self._usage
        self.tasks: dict[str, Task] = {}
        self.refusals: dict[str, str] = {}  # task id -> why its last write was refused
        self._forks: dict[str, list[Task]] = {}  # parent id -> forks waiting for it to end
        self._latest: dict[int, str] = {}
        self._next_id = 1
        self.replays = Replays(self)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started.set()
            if self.keeper is not None:
                nursery.start_soon(self.keeper.run, self)
            for name, runtime in list(self.runtimes.items()):
                self._start(name, runtime)
            for name in list(self._deferred):
                nursery.start_soon(self._load_deferred, name)
            if self.idle_unload_s > 0:
                nursery.start_soon(self._unload_idle)

    def restore(self) -> None:
        """Bring back the journaled tasks (see axfs.persist)."""
        if self.keeper is not None:
            self.keeper.restore(self)

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close()
        for runtime in self.runtimes.values():
            runtime.close()
        self.runtimes.clear()

    # -- the default model's runtime (the views of memory and scheduling show it) -----

    def local(self, name: str | None = None) -> LocalRuntime | None:
        runtime = self.runtimes.get(name or self.registry.default)
        return runtime if isinstance(runtime, LocalRuntime) else None

    def _default_local(self) -> LocalRuntime:
        runtime = self.local() or next((r for r in self.runtimes.values()
                                        if isinstance(r, LocalRuntime)), None)
        if runtime is None:
            raise Unavailable("no local model is loaded")
        return runtime

    @property
    def driver(self) -> Driver:
        return self._default_local().driver

    @property
    def engine(self) -> Engine:
        return self._default_local().engine

    @property
    def kv(self) -> KVManager:
        return self._default_local().kv

    @property
    def scheduler(self) -> Scheduler:
        return self._default_local().scheduler

    @property
    def model_sha(self) -> str:
        return self.keeper.model_sha if self.keeper else ""

    @property
    def models(self) -> set[str]:
        return set(self.registry.entries)

    def _usage(self, uid: int) -> int:
        return int(sum(r.scheduler.policy.users().get(uid, (0.0, 0.0))[1]
                       for r in self.runtimes.values() if isinstance(r, LocalRuntime)))

    # -- loading and unloading models ---------------------------------------------------

    def _attach(self, runtime: Runtime) -> None:
        runtime.on_end = self._ended
        self.runtimes[runtime.name] = runtime

    def _start(self, name: str, runtime: Runtime) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._scopes[name] = scope
        self._nursery.start_soon(self._serve, runtime, scope)

    async def _serve(self, runtime: Runtime, scope: trio.CancelScope) -> None:
        with scope:
            await runtime.run()
        runtime.close()  # unloaded: its loop has stopped, so nothing uses it now

    async def runtime(self, name: str) -> Runtime:
        """The runtime of model ``name``, loading it first if it is not loaded."""
        runtime = self.runtimes.get(name)
        if runtime is not None:
            runtime.last_used = time.monotonic()  # not idle: a task is about to use it
            return runtime
        entry = self.registry.entries.get(name)
        if entry is None:
            raise NotFound(f"no model named {name!r}")
        loading = self._loading.get(name)
        if loading is None:
            loading = self._loading[name] = trio.Event()
            try:
                return await self._load(entry)
            finally:
                loading.set()
                del self._loading[name]
        await loading.wait()
        runtime = self.runtimes.get(name)
        if runtime is None:
            raise Unavailable(self._load_errors.get(name, f"model {name} did not load"))
        return runtime

    async def _load(self, entry: ModelEntry) -> Runtime:
        await self._started.wait()
        if not entry.configured:
            raise BadInput(f"model {entry.name} has no file or endpoints yet (write "
                           f"'endpoints URL...' to models/{entry.name}/ctl)")
        started = time.monotonic()
        self.trace.emit("model_loading", model=entry.name)
        runtime: Runtime
        try:
            if entry.remote:
                runtime = RemoteRuntime(entry.name, entry.endpoints, self.trace)
            else:
                if self.loader is None:
                    raise Unavailable("this kernel cannot load models")
                driver = await trio.to_thread.run_sync(self.loader, entry)
                sha = await trio.to_thread.run_sync(self.sha_of, entry.path)
                swap = SwapSpace(self.options.swap_mem, self._swap_dir)
                runtime = LocalRuntime(entry.name, driver, self.trace, self.options, swap, sha)
        except (DriverError, OSError, ValueError, AxfsError) as e:
            why = f"model {entry.name} cannot be loaded: {e}"
            self._load_errors[entry.name] = why
            self.trace.emit("error", model=entry.name, reason=why)
            raise Unavailable(why) from e
        self._load_errors.pop(entry.name, None)
        self._attach(runtime)
        self._start(entry.name, runtime)
        self.trace.emit("model_load", model=entry.name, path=entry.path or ",".join(entry.endpoints),
                        sha256=runtime.sha or "-", seconds=round(time.monotonic() - started, 3))
        for action in self._deferred.pop(entry.name, []):
            action(runtime)
        return runtime

    async def _load_deferred(self, name: str) -> None:
        try:
            await self.runtime(name)
        except AxfsError as e:
            for task in self._unfinished(name):
                self.finish(task, State.FAILED, "error", str(e))
            self._deferred.pop(name, None)

    def when_loaded(self, name: str, action: Callable[[Runtime], None]) -> None:
        """Do ``action`` with model ``name``'s runtime: now if it is loaded, else once it
        has loaded (restored tasks of a model not loaded yet)."""
        runtime = self.runtimes.get(name)
        if runtime is not None:
            action(runtime)
            return
        self._deferred.setdefault(name, []).append(action)
        if self._nursery is not None and name not in self._loading:
            self._nursery.start_soon(self._load_deferred, name)

    def unload(self, name: str, reason: str = "ctl") -> None:
        runtime = self.runtimes.get(name)
        if runtime is None:
            return
        if runtime.active():
            raise Busy(f"model {name} is running {runtime.active()} tasks")
        del self.runtimes[name]
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()
        else:
            runtime.close()
        self.trace.emit("model_unload", model=name, reason=reason)

    async def _unload_idle(self) -> None:
        while True:
            await trio.sleep(min(5.0, self.idle_unload_s))
            now = time.monotonic()
            for name, runtime in list(self.runtimes.items()):
                if name == self.registry.default:
                    continue  # tasks/new uses it: it stays loaded
                if not runtime.active() and now - runtime.last_used >= self.idle_unload_s:
                    self.unload(name, reason="idle")

    def _unfinished(self, name: str) -> list[Task]:
        """Tasks submitted to model ``name`` that have not ended."""
        return [t for t in self.tasks.values()
                if t.config.model == name and not t.finished and t.state is not State.DRAFT]

    def in_use(self, name: str) -> int:
        return len(self._unfinished(name))

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
        self.accepted(task)

    async def submit_new(self, uid: int, gid: int, data: bytes) -> Task:
        """``echo PROMPT > tasks/new``: a new task with default parameters, queued."""
        text = self._prompt_text(uid, None, data)
        self.check_quota(uid, None, None)
        task = self.create(uid, gid)
        try:
            await self._queue(task, text)
        except AxfsError as e:
            # Its model could not be loaded: the task shows why (tasks/latest/error).
            self._latest[uid] = task.id
            task.prompt = text
            task.finish(State.FAILED, "error", str(e))
            raise
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

        Its context is the parent's prompt, what the parent generated and TEXT (with chat
        on, TEXT as the next user turn); it shares the parent's KV (the prefix cache
        finds it) and its parameters. A fork of a task that has not ended waits for it.
        """
        self.check_forkable(parent, uid)
        text = self._prompt_text(uid, parent, data)
        self.check_quota(uid, parent, parent.config)
        try:
            runtime = await self.runtime(parent.config.model)
        except AxfsError as e:
            raise self.reject(uid, parent, e) from e
        task = self.create(uid, gid)
        self.accepted(parent)
        task.config = parent.config.copy()
        task.parent = parent.id
        task.prompt = text
        self._latest[uid] = task.id
        try:
            if parent.finished:
                self._start_fork(task, parent, runtime, durable=True)
                return task
            task.submit(text, [])
            task.model_sha = runtime.sha
            task.deterministic = runtime.deterministic
            self._record(task)
        except AxfsError as e:  # not recorded: a failed task, gone after a restart
            task.finish(State.FAILED, "error", str(e))
            raise
        self._forks.setdefault(parent.id, []).append(task)
        self.trace.emit("fork", task.id, uid, parent=parent.id, waiting="yes")
        return task

    def check_quota(self, uid: int, task: Task | None, config: TaskConfig | None,
                    size: int = 0) -> None:
        """Whether ``uid`` may queue one more task (with ``config``; None: the defaults),
        and, while the journal could not write, whether it can record ``size`` bytes now."""
        try:
            self.quota.check_submit(uid, config)
            if self.keeper is not None:
                self.keeper.check(size)
        except AxfsError as e:
            raise self.reject(uid, task, e) from e

    def check_forkable(self, parent: Task, uid: int) -> None:
        if parent.state is State.DRAFT:
            raise self.reject(uid, parent, Busy(
                f"task {parent.id} has no prompt yet: there is nothing to fork"))

    def _start_fork(self, task: Task, parent: Task, runtime: Runtime, durable: bool = False) -> None:
        """Queue a fork whose parent has ended; ``durable``: the write that made it waits
        for its record (a fork that waited for its parent was recorded then)."""
        if parent.state is State.FAILED:
            error = f"task {parent.id}, which this one continues, failed: {parent.error}"
            self.trace.emit("error", task.id, task.uid, reason=error)
            self.finish(task, State.FAILED, "error", error)
            return
        try:
            added = self._follow_up(parent, task.prompt, runtime) if task.config.chat \
                else task.prompt
        except AxfsError as e:
            self.trace.emit("error", task.id, task.uid, reason=str(e))
            self.finish(task, State.FAILED, "error", str(e))
            return
        if runtime.seq_limit is None:  # remote: the context goes as text
            task.model_prompt = parent.text_for_model + parent.output.decode("utf-8", "replace") \
                + added
            task.submit(task.prompt, [])
        else:
            task.follow_up = runtime.tokenize(added, bos=False, special=task.config.chat)
            task.submit(task.prompt, parent.context() + task.follow_up)
        task.model_sha = runtime.sha
        task.deterministic = runtime.deterministic
        if durable:
            self._record(task)
        elif self.keeper is not None:
            self.keeper.submitted(task, durable=False)
        self.trace.emit("fork", task.id, task.uid, parent=parent.id,
                        context_tokens=len(task.prompt_tokens))
        self._enqueue(task, runtime)

    def _template(self, runtime: Runtime) -> str:
        entry = self.registry.entries.get(runtime.name)
        template = entry.template if entry else ""
        if not template and isinstance(runtime, LocalRuntime):
            template = getattr(runtime.driver, "chat_template", "")
        if not template:
            raise BadInput(f"model {runtime.name} has no chat template (write 'template NAME' "
                           f"to models/{runtime.name}/ctl, or 'chat off' to config)")
        return template

    def _follow_up(self, parent: Task, text: str, runtime: Runtime) -> str:
        """A fork's text as the next user turn of a chat (see drivers.chat)."""
        try:
            return chat.follow_up(self._template(runtime), parent.prompt,
                                  parent.output.decode("utf-8", "replace"), text)
        except chat.ChatError as e:
            raise BadInput(f"chat template: {e}") from e

    def _ended(self, task: Task) -> None:
        """A runtime's word that ``task`` ended: journal it, start the forks waiting for
        it, finish a replay."""
        if self.keeper is not None:
            self.keeper.ended(task)
        self.replays.ended(task)
        children = [c for c in self._forks.pop(task.id, []) if not c.finished]

        def start_children(runtime: Runtime) -> None:
            for child in children:
                self._start_fork(child, task, runtime)

        if children:
            self.when_loaded(task.config.model, start_children)

    def finish(self, task: Task, state: State, reason: str, error: str = "") -> None:
        """End ``task`` through its model's runtime, or here if that is not loaded."""
        runtime = self.runtimes.get(task.config.model)
        if runtime is not None:
            runtime.end(task, state, reason, error)
            return
        was_finished = task.finished
        task.finish(state, reason, error)
        if not was_finished:
            self._ended(task)

    async def _queue(self, task: Task, text: str) -> None:
        try:
            runtime = await self.runtime(task.config.model)
            if task.config.chat:
                try:
                    task.model_prompt = chat.render(self._template(runtime), [("user", text)])
                except chat.ChatError as e:
                    raise BadInput(f"chat template: {e}") from e
            model_text = task.model_prompt or text
            tokens = await trio.to_thread.run_sync(
                lambda: runtime.tokenize(model_text, special=task.config.chat))
        except AxfsError as e:
            task.model_prompt = ""
            raise self.reject(task.uid, task, e) from e
        task.submit(text, tokens)
        task.model_sha = runtime.sha
        task.deterministic = runtime.deterministic
        try:
            if self.keeper is not None:
                await self.keeper.submitted_off_thread(task)
        except AxfsError as e:  # not on disk, so not accepted: a draft stays a draft
            if not task.finished:
                task.state, task.submitted_at, task.waiting_since = State.DRAFT, 0.0, 0.0
                task.prompt, task.prompt_tokens, task.model_prompt = "", [], ""
            raise self.reject(task.uid, task, e) from e
        self._latest[task.uid] = task.id
        if not task.finished:  # not killed while its record was written
            self._enqueue(task, runtime)

    def _record(self, task: Task) -> None:
        """Journal a submission before the write that made it returns (see axfs.journal);
        refused with the disk's errno (ENOSPC) when it cannot be written."""
        if self.keeper is not None:
            try:
                self.keeper.submitted(task)
            except AxfsError as e:
                raise self.reject(task.uid, task, e) from e

    def _enqueue(self, task: Task, runtime: Runtime) -> None:
        """Hand a journaled submission to its model."""
        tokens = task.prompt_tokens
        task.model_sha = runtime.sha
        task.deterministic = runtime.deterministic
        self.trace.emit("submit", task.id, task.uid, prompt_tokens=len(tokens),
                        max_tokens=task.config.max_tokens, model=task.config.model)
        task.mark("submit", prompt_tokens=len(tokens), max_tokens=task.config.max_tokens)
        self._add(task, runtime)

    def _add(self, task: Task, runtime: Runtime) -> None:
        """Hand a submitted task to its model's runtime (the one loaded now, should
        ``runtime`` have been unloaded meanwhile), or fail it if its prompt cannot fit."""
        if self.runtimes.get(runtime.name) is not runtime:
            self.when_loaded(runtime.name, lambda again: self._add(task, again))
            return
        tokens = task.prompt_tokens
        limit = runtime.seq_limit
        if limit is not None and len(tokens) >= limit:
            error = NoSpace(f"prompt is {len(tokens)} tokens; a task's context holds "
                            f"{limit} tokens with room for at least one more")
            self.trace.emit("error", task.id, task.uid, reason=str(error))
            runtime.end(task, State.FAILED, "error", str(error))
            return
        runtime.add(task)

    # -- changing tasks --------------------------------------------------------------

    def check_config(self, task: Task, text: str, reset: bool = False) -> TaskConfig:
        """What ``text`` written to the task's config would make it (from a new task's
        defaults with ``reset``: the file opened with O_TRUNC); raises why not."""
        if task.state is not State.DRAFT and task.state is not State.QUEUED:
            raise self.reject(task.uid, task, Busy(
                f"task {task.id} is {task.state}: config is writable until the task starts"))
        base = task.config
        if reset:
            base = self.quota.fit(task.uid, self.defaults.copy())
        try:
            config = base.updated(text, self.models)
            self.quota.check_config(task.uid, config)
        except AxfsError as e:
            raise self.reject(task.uid, task, e) from e
        return config

    def configure(self, task: Task, text: str, reset: bool = False) -> None:
        """Apply the lines written to a task's config through one open file (see
        axfs.fs.edits): all of them, or none and the reason."""
        config, old = self.check_config(task, text, reset), task.config
        task.config = config
        if task.state is State.QUEUED:  # submitted: the journal keeps its parameters
            config.fix_seed()
            try:
                self._record(task)
            except AxfsError:
                task.config = old
                raise
        self.accepted(task)
        self.trace.emit("config", task.id, task.uid, text=text.strip(), reset="yes" if reset else "no")

    def control(self, task: Task, text: str) -> None:
        """Apply one ``ctl`` command: ``kill`` or ``priority N``."""
        words = text.split()
        where = f"ctl {text.strip()[:60]!r}"
        if words == ["kill"]:
            journaled = task.state is not State.DRAFT and not task.finished
            self.kill(task)
            if self.keeper is not None and journaled:  # on disk before the write returns
                try:
                    self.keeper.sync()
                except AxfsError as e:
                    raise self.reject(task.uid, task, e) from e
            self.accepted(task)
            return
        if len(words) == 2 and words[0] == "priority":
            try:
                priority = parse_setting("priority", words[1], where)
            except BadInput as e:
                raise self.reject(task.uid, task, e) from e
            assert isinstance(priority, int)
            task.config.priority = priority
            self.accepted(task)
            self.trace.emit("priority", task.id, task.uid, priority=task.config.priority)
            return
        raise self.reject(task.uid, task, BadInput(
            f"ctl: cannot parse {text.strip()[:60]!r} (commands: kill, priority N)"))

    def replay(self, task: Task, uid: int, text: str) -> None:
        """A command written to replay/ID/ctl (``run``). A refusal is the replay's, not
        the task's: it goes to trace and users/UID, not to tasks/ID/error."""
        try:
            self.replays.control(task, text)
        except AxfsError as e:
            raise self.reject(uid, None, e, task.id) from e

    def kill(self, task: Task) -> None:
        if task.finished:
            return
        self.trace.emit("kill", task.id, task.uid, state=task.state, tokens=task.num_generated)
        self.finish(task, State.KILLED, "killed")

    def remove(self, task: Task, reason: str = "rm") -> None:
        """``rm -r tasks/ID``: kill the task if it still runs, then forget it. ``rm`` of a
        submitted task is on disk before it returns (refused if it cannot be)."""
        if self.keeper is not None:
            try:
                self.keeper.removed(task, durable=reason == "rm" and task.state is not State.DRAFT)
            except AxfsError as e:
                raise self.reject(task.uid, task, e) from e
        self.kill(task)
        self.tasks.pop(task.id, None)
        self.refusals.pop(task.id, None)
        if self._latest.get(task.uid) == task.id:
            del self._latest[task.uid]
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
        text is rebuilt from them and it runs on from there (once its model is loaded).
        A remote task starts again: its text was the remote engine's."""
        self.when_loaded(task.config.model, lambda runtime: self._resume(task, generated, runtime))

    def _resume(self, task: Task, generated: list[int], runtime: Runtime) -> None:
        if task.finished:
            return
        if runtime.seq_limit is None:
            generated = []
        for token in generated:
            if task.finished:
                break
            task.add_token(token, runtime.piece(token), runtime.is_eog(token),
                           limit_reached=False)
        task.deterministic = task.deterministic and runtime.deterministic
        self.trace.emit("resume", task.id, task.uid, tokens=len(generated))
        if task.finished:
            runtime.end(task, task.state, task.finish_reason)
            return
        task.state = State.QUEUED
        task.waiting_since = time.time()
        task.stepwise_until = task.num_history - 1
        runtime.add(task)

    def resume_fork(self, task: Task) -> None:
        parent = self.tasks.get(task.parent)
        if parent is None:
            self.finish(task, State.FAILED, "error",
                         f"task {task.parent}, which this one continues, is gone")
        elif parent.finished:
            self.when_loaded(task.config.model, lambda runtime: self._start_fork(task, parent, runtime))
        else:
            self._forks.setdefault(parent.id, []).append(task)

    def sha_for(self, task: Task) -> str:
        """The sha256 of the file of the model ``task`` names now ("" if unknown)."""
        runtime = self.runtimes.get(task.config.model)
        if runtime is not None:
            return runtime.sha
        entry = self.registry.entries.get(task.config.model)
        if entry is None or not entry.path:
            return ""
        try:
            return self.sha_of(entry.path)
        except (OSError, ValueError):  # gone, or not a regular file now
            return ""

    def reject(self, uid: int, task: Task | None, error: AxfsError, about: str = "-") -> AxfsError:
        """Record why a request was refused (trace, users/UID, and the task's error file
        until a later write to it succeeds) and return it to raise. ``about``: the id
        the request named, where it was not a write to the task itself (replay/ID)."""
        about = task.id if task else about
        self.trace.emit("reject", about, uid, reason=str(error))
        self.quota.refused(uid, about, str(error))
        if task is not None:
            self.refusals[task.id] = str(error)
            task.notify()
        return error

    def accepted(self, task: Task) -> None:
        """A write to ``task`` succeeded: an older refusal no longer shows in its error."""
        if self.refusals.pop(task.id, None) is not None:
            task.notify()

    def error_text(self, task: Task) -> str:
        """tasks/ID/error: why the task failed, then why the last write to it was refused
        (if the last write was refused)."""
        refusal = self.refusals.get(task.id, "")
        lines = [s for s in (task.error, refusal if refusal != task.error else "") if s]
        return "".join(f"{line}\n" for line in lines)
