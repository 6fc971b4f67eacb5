"""Loading and unloading models: one runtime per loaded model (axfs.runtime, axfs.remote).

A local model is loaded on demand by the mount's loader (in a worker thread), a remote
one is reached through its endpoints; either is unloaded by ``ctl`` or after
``idle_unload_s`` without work (0: never). Work for a model that is not loaded yet
(restored tasks) waits for it (``when_loaded``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from axfs.errors import AxfsError, BadInput, Busy, NotFound, Unavailable
from axfs.models import ModelEntry, Registry
from axfs.remote import open_remote
from axfs.runtime import LocalOptions, LocalRuntime, Runtime
from axfs.swap import SwapSpace
from axfs.task import State, Task
from axfs.timeline import Finish
from axfs.trace import Event, Trace
from drivers.base import Driver, DriverError

Loader = Callable[[ModelEntry], Driver]  # loads a local model (in a worker thread)


class Loading:
    """The loaded models' runtimes (``runtimes``, by name) and their loading.

    ``tasks`` is the kernel's table (whose tasks a model has unfinished); ``on_end`` is
    told of every task that ends, whichever runtime ended it."""

    def __init__(self, registry: Registry, trace: Trace, tasks: Mapping[str, Task],
                 options: LocalOptions, on_end: Callable[[Task], None], loader: Loader | None = None,
                 sha_of: Callable[[str], str] | None = None, swap_dir: Path | None = None,
                 idle_unload_s: float = 0.0) -> None:
        self.registry = registry
        self.trace = trace
        self.tasks = tasks
        self.options = options
        self.on_end = on_end
        self.loader = loader
        self.sha_of = sha_of or (lambda path: "")
        self.swap_dir = swap_dir
        self.idle_unload_s = idle_unload_s
        self.runtimes: dict[str, Runtime] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._loading: dict[str, trio.Event] = {}
        self._errors: dict[str, str] = {}
        self._deferred: dict[str, list[Callable[[Runtime], None]]] = {}  # until it loads
        self._nursery: trio.Nursery | None = None
        self._started = trio.Event()  # run() has its nursery: models can be loaded

    def add_local(self, driver: Driver, swap: SwapSpace | None, sha: str) -> None:
        """Serve ``driver``, loaded already, as the default model."""
        name = driver.info.name
        if name not in self.registry.entries:
            self.registry.add(ModelEntry(name, path=driver.info.path))
        self.registry.default = name
        self._attach(LocalRuntime(name, driver, self.trace, self.options, swap, sha))
        self.trace.emit(Event.MODEL_LOAD, model=name, path=driver.info.path, sha256=sha or "-")

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started.set()
            for name, runtime in list(self.runtimes.items()):
                self._start(name, runtime)
            for name in list(self._deferred):
                nursery.start_soon(self._load_deferred, name)
            if self.idle_unload_s > 0:
                nursery.start_soon(self._unload_idle)

    def close(self) -> None:
        for runtime in self.runtimes.values():
            runtime.close()
        self.runtimes.clear()

    # -- finding runtimes ------------------------------------------------------------

    def local(self, name: str | None = None) -> LocalRuntime | None:
        """Model ``name``'s (None: the default's) runtime, if it is loaded and local."""
        runtime = self.runtimes.get(name or self.registry.default)
        return runtime if isinstance(runtime, LocalRuntime) else None

    def unfinished(self, name: str) -> list[Task]:
        """Tasks submitted to model ``name`` that have not ended."""
        return [t for t in self.tasks.values()
                if t.config.model == name and not t.finished and t.state is not State.DRAFT]

    def load_error(self, name: str) -> str:
        return self._errors.get(name, "")

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

    def finish(self, task: Task, state: State, reason: Finish, error: str = "") -> None:
        """End ``task`` through its model's runtime, or here if that is not loaded."""
        runtime = self.runtimes.get(task.config.model)
        if runtime is not None:
            runtime.end(task, state, reason, error)
            return
        was_finished = task.finished
        task.finish(state, reason, error)
        if not was_finished:
            self.on_end(task)

    # -- loading -----------------------------------------------------------------------

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
            raise Unavailable(self._errors.get(name, f"model {name} did not load"))
        return runtime

    def load_soon(self, entry: ModelEntry) -> None:
        """``load`` written to models/NAME/ctl: load it in the background (why it did not
        load goes to the trace and models/NAME/info)."""
        if self._nursery is None:
            raise Unavailable("the kernel is not running")
        if not entry.configured:
            raise BadInput(f"model {entry.name} has no file or endpoints yet")
        self._nursery.start_soon(self._load_quietly, entry.name)

    async def _load_quietly(self, name: str) -> None:
        with contextlib.suppress(AxfsError):  # the reason is in the trace and in info
            await self.runtime(name)

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

    async def _load(self, entry: ModelEntry) -> Runtime:
        await self._started.wait()
        if not entry.configured:
            raise BadInput(f"model {entry.name} has no file or endpoints yet (write "
                           f"'endpoints URL...' to models/{entry.name}/ctl)")
        started = time.monotonic()
        self.trace.emit(Event.MODEL_LOADING, model=entry.name)
        runtime: Runtime
        try:
            if entry.remote:
                runtime = await open_remote(entry, self.trace, self.options.policy)
            else:
                if self.loader is None:
                    raise Unavailable("this kernel cannot load models")
                driver = await trio.to_thread.run_sync(self.loader, entry)
                sha = await trio.to_thread.run_sync(self.sha_of, entry.path)
                swap = SwapSpace(self.options.swap_mem, self.swap_dir)
                runtime = LocalRuntime(entry.name, driver, self.trace, self.options, swap, sha)
        except (DriverError, OSError, ValueError, AxfsError) as e:
            why = f"model {entry.name} cannot be loaded: {e}"
            self._errors[entry.name] = why
            self.trace.emit(Event.ERROR, model=entry.name, reason=why)
            raise Unavailable(why) from e
        self._errors.pop(entry.name, None)
        self._attach(runtime)
        self._start(entry.name, runtime)
        self.trace.emit(Event.MODEL_LOAD, model=entry.name, path=entry.path or ",".join(entry.endpoints),
                        sha256=runtime.sha or "-", seconds=round(time.monotonic() - started, 3))
        for action in self._deferred.pop(entry.name, []):
            action(runtime)
        return runtime

    async def _load_deferred(self, name: str) -> None:
        try:
            await self.runtime(name)
        except AxfsError as e:
            for task in self.unfinished(name):
                self.finish(task, State.FAILED, Finish.ERROR, str(e))
            self._deferred.pop(name, None)

    def _attach(self, runtime: Runtime) -> None:
        runtime.on_end = self.on_end
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

    # -- unloading -----------------------------------------------------------------------

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
        self.trace.emit(Event.MODEL_UNLOAD, model=name, reason=reason)

    async def _unload_idle(self) -> None:
        while True:
            await trio.sleep(min(5.0, self.idle_unload_s))
            now = time.monotonic()
            for name, runtime in list(self.runtimes.items()):
                if name == self.registry.default:
                    continue  # tasks/new uses it: it stays loaded
                if not runtime.active() and now - runtime.last_used >= self.idle_unload_s:
                    self.unload(name, reason="idle")
