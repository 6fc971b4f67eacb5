"""The kernel: the tasks, the models, the scheduler and the engine behind the tree.

Every operation the FUSE adapter offers is one method here; each either does what
was asked or raises an ``axfs.errors`` exception whose message says why, after
writing that reason into the trace (and the task's ``error`` file where there is a
task). The kernel builds its parts and hands each request to the one whose job it is:

- ``loading`` (axfs.loading): the loaded models' runtimes, loading and unloading;
- ``registry_ops`` (axfs.modelctl): the registry's operations, ``models/NAME/ctl``;
- ``table`` (axfs.tasktable): the tasks by id, each user's latest;
- ``submissions`` (axfs.submit), with ``prompts`` (axfs.prompts): submitting and forking;
- ``task_control`` (axfs.taskctl): config, ``tasks/ID/ctl``, kill and remove;
- ``refusals`` (axfs.refusals): why a request was refused, where it shows;
- ``restorer`` (axfs.restore) and ``keeper`` (axfs.persist): the journal;
- ``replays`` (axfs.replay).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from axfs.config import TaskConfig
from axfs.errors import AxfsError, BadInput
from axfs.loading import Loader, Loading
from axfs.modelctl import ModelControl
from axfs.models import ModelCopy, ModelEntry, Registry
from axfs.persist import Keeper
from axfs.prompts import Prompts
from axfs.quota import Quota
from axfs.refusals import Refusals
from axfs.replay import Replays
from axfs.restore import Restore
from axfs.runtime import LocalOptions, LocalRuntime
from axfs.submit import Submissions
from axfs.swap import SwapSpace
from axfs.task import Task
from axfs.taskctl import TaskControl
from axfs.tasktable import TaskTable
from axfs.trace import Trace
from drivers.base import Driver
from drivers.gguf import GgufInfo


class Kernel:
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
        self.quota = quota or Quota()
        self.quota.usage = self._usage
        self.defaults = TaskConfig()
        self.table = TaskTable(self.quota, self.defaults)
        self.tasks = self.table.tasks
        options = LocalOptions(policy, prefix_cache, cache_limit,
                               swap.mem_limit if swap else 512 << 20, overlap)
        self.loading = Loading(self.registry, self.trace, self.tasks, options, self._ended,
                               loader, sha_of, swap.directory if swap else None, idle_unload_s)
        self.runtimes = self.loading.runtimes
        if driver is not None:
            self.loading.add_local(driver, swap, keeper.model_sha if keeper else "")
        self.defaults.model = self.registry.default
        self.registry_ops = ModelControl(self.registry, self.loading, self.defaults, copy_dir)
        self.refusals = Refusals(self.trace, self.quota)
        self.submissions = Submissions(self.table, self.loading, Prompts(self.registry, self.quota),
                                       self.refusals, keeper)
        self.task_control = TaskControl(self.table, self.loading, self.submissions, self.refusals,
                                        keeper)
        self.on_remove = self.task_control.on_remove  # told (task, reason) of each removal
        self.restorer = Restore(self.table, self.loading, self.submissions)
        self.replays = Replays(self.trace, self.loading.local)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.keeper is not None:
                nursery.start_soon(self.keeper.run, self)
            nursery.start_soon(self.loading.run)

    def restore(self) -> None:
        """Bring back the journaled tasks (axfs.restore), then drop those past the
        retention limits and compact the journal (axfs.persist)."""
        if self.keeper is not None:
            self.restorer.restore(self.keeper)
            self.keeper.retain(self)
            self.keeper.compact(self)

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close()
        self.loading.close()

    def _ended(self, task: Task) -> None:
        """A runtime's word that ``task`` ended: journal it, finish a replay of it, start
        the forks waiting for it."""
        if self.keeper is not None:
            self.keeper.ended(task)
        self.replays.ended(task)
        self.submissions.parent_ended(task)

    def _usage(self, uid: int) -> int:
        return int(sum(r.policy.users().get(uid, (0.0, 0.0))[1] for r in self.runtimes.values()))

    # -- models ------------------------------------------------------------------------

    @property
    def models(self) -> set[str]:
        return set(self.registry.entries)

    @property
    def model_sha(self) -> str:
        return self.keeper.model_sha if self.keeper else ""

    def local(self, name: str | None = None) -> LocalRuntime | None:
        return self.loading.local(name)

    def piece_of(self, task: Task) -> Callable[[int], bytes] | None:
        """A token's bytes in ``task``'s model; None while that model is not loaded here
        (and for a remote one, whose tokens have no ids)."""
        runtime = self.local(task.config.model)
        return runtime.piece if runtime else None

    def in_use(self, name: str) -> int:
        return len(self.loading.unfinished(name))

    def load_error(self, name: str) -> str:
        return self.loading.load_error(name)

    def unload(self, name: str, reason: str = "ctl") -> None:
        self.loading.unload(name, reason)

    async def register(self, name: str, path: str, copied: bool = False,
                       uid: int | str = "-") -> ModelEntry:
        return await self.registry_ops.register(name, path, copied, uid)

    def begin_copy(self, filename: str, uid: int | str = "-") -> ModelCopy:
        return self.registry_ops.begin_copy(filename, uid)

    def copy_wrote(self, copy: ModelCopy, before: int) -> None:
        self.registry_ops.copy_wrote(copy, before)

    async def register_copy(self, copy: ModelCopy, uid: int | str = "-") -> ModelEntry:
        return await self.registry_ops.register_copy(copy, uid)

    def add_remote(self, name: str, uid: int | str = "-") -> ModelEntry:
        return self.registry_ops.add_remote(name, uid)

    def unregister(self, name: str, uid: int | str = "-") -> None:
        self.registry_ops.unregister(name, uid)

    async def model_control(self, name: str, text: str, uid: int | str = "-") -> None:
        await self.registry_ops.control(name, text, uid)

    def file_info(self, name: str) -> GgufInfo | str:
        return self.registry_ops.file_info(name)

    async def refresh_info(self, name: str) -> None:
        await self.registry_ops.refresh_info(name)

    # -- tasks -------------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        return self.table.get(task_id)

    def latest(self, uid: int) -> Task | None:
        return self.table.latest(uid)

    def create(self, uid: int, gid: int, name: str | None = None) -> Task:
        """A draft task (``mkdir tasks/NAME``)."""
        try:
            return self.table.create(uid, gid, name)
        except BadInput as e:
            raise self.reject(uid, None, e) from e

    def check_prompt_bytes(self, data: bytes, before: int = 0, uid: int = 0,
                           utf8: codecs.IncrementalDecoder | None = None) -> None:
        self.submissions.prompts.check_bytes(data, before, uid, utf8)

    def check_quota(self, uid: int, task: Task | None, config: TaskConfig | None,
                    size: int = 0) -> None:
        self.submissions.check_quota(uid, task, config, size)

    def check_prompt_write(self, uid: int, task: Task | None, data: bytes, before: int,
                           utf8: codecs.IncrementalDecoder, fork: bool = False,
                           submitted: bool = False) -> None:
        self.submissions.check_prompt_write(uid, task, data, before, utf8, fork, submitted)

    def check_forkable(self, parent: Task, uid: int) -> None:
        self.submissions.check_forkable(parent, uid)

    async def submit(self, task: Task, data: bytes, turns: Sequence[tuple[str, str]] = ()) -> None:
        await self.submissions.submit(task, data, turns)

    async def submit_new(self, uid: int, gid: int, data: bytes) -> Task:
        return await self.submissions.submit_new(uid, gid, data)

    async def fork(self, parent: Task, uid: int, gid: int, data: bytes) -> Task:
        return await self.submissions.fork(parent, uid, gid, data)

    def check_config(self, task: Task, text: str, reset: bool = False) -> TaskConfig:
        return self.task_control.check_config(task, text, reset)

    def configure(self, task: Task, text: str, reset: bool = False) -> None:
        self.task_control.configure(task, text, reset)

    def constrain(self, task: Task, kind: str, text: str, reset: bool) -> None:
        self.task_control.constrain(task, kind, text, reset)

    def check_constraint(self, task: Task, kind: str, text: str) -> str:
        return self.task_control.check_constraint(task, kind, text)

    def control(self, task: Task, text: str) -> None:
        self.task_control.control(task, text)

    def kill(self, task: Task, reason: str = "") -> None:
        self.task_control.kill(task, reason)

    def remove(self, task: Task, reason: str = "rm") -> None:
        self.task_control.remove(task, reason)

    def replay(self, task: Task, uid: int, text: str) -> None:
        """A command written to replay/ID/ctl (``run``). A refusal is the replay's, not
        the task's: it goes to trace and users/UID, not to tasks/ID/error."""
        try:
            self.replays.control(task, text)
        except AxfsError as e:
            raise self.reject(uid, None, e, task.id) from e

    # -- refusals ----------------------------------------------------------------------

    def reject(self, uid: int, task: Task | None, error: AxfsError, about: str = "-") -> AxfsError:
        return self.refusals.reject(uid, task, error, about)

    def accepted(self, task: Task) -> None:
        self.refusals.accepted(task)

    def error_text(self, task: Task) -> str:
        return self.refusals.error_text(task)
