"""Changing tasks: their config, the commands of ``tasks/ID/ctl``, kill and remove."""

from __future__ import annotations

from collections.abc import Callable

from axfs import ctl
from axfs.config import TaskConfig, parse_setting
from axfs.errors import AxfsError, BadInput, Busy
from axfs.loading import Loading
from axfs.persist import Keeper
from axfs.refusals import Refusals
from axfs.submit import Submissions
from axfs.task import State, Task
from axfs.tasktable import TaskTable
from axfs.timeline import Finish
from axfs.trace import Event
from drivers import grammar as grammars

COMMANDS = (ctl.Verb("kill"), ctl.Verb("priority", "N", least=1, most=1))  # tasks/ID/ctl


class TaskControl:
    def __init__(self, table: TaskTable, loading: Loading, submissions: Submissions,
                 refusals: Refusals, keeper: Keeper | None) -> None:
        self.table = table
        self.loading = loading
        self.submissions = submissions
        self.refusals = refusals
        self.reject = refusals.reject
        self.quota = table.quota
        self.keeper = keeper
        self.trace = loading.trace
        # Told of each task removed, with the reason ("rm": by rmdir through the tree).
        self.on_remove: list[Callable[[Task, str], None]] = []

    def check_config(self, task: Task, text: str, reset: bool = False) -> TaskConfig:
        """What ``text`` written to the task's config would make it (from a new task's
        defaults with ``reset``: the file opened with O_TRUNC); raises why not."""
        if task.state is not State.DRAFT and task.state is not State.QUEUED:
            raise self.reject(task.uid, task, Busy(
                f"task {task.id} is {task.state}: config is writable until the task starts"))
        base = task.config
        if reset:  # the output's grammar is not config's: it is kept
            base = self.quota.fit(task.uid, self.table.defaults.copy())
            base.grammar, base.schema = task.config.grammar, task.config.schema
        try:
            config = base.updated(text, set(self.loading.registry.entries))
            entry = self.loading.registry.entries.get(config.model)
            if entry is not None and entry.remote:
                config.check_remote()
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
                self.submissions.record(task)
            except AxfsError:
                task.config = old
                raise
        self.refusals.accepted(task)
        self.trace.emit(Event.CONFIG, task.id, task.uid, text=text.strip(),
                        reset="yes" if reset else "no")

    def constrain(self, task: Task, kind: str, text: str, reset: bool) -> None:
        """Apply what was written to a draft's ``schema`` or ``grammar`` (``kind``) through
        one open file: compiled, or refused with the compiler's reason, and then the
        prompt is refused too until a later write compiles (empty: no constraint)."""
        config = task.config
        if not reset:  # >>: added to what is there
            text = (config.schema if kind == "schema" else config.grammar) + text
        grammar = self.check_constraint(task, kind, text)
        config.grammar, config.schema = grammar, text if kind == "schema" and grammar else ""
        self.refusals.accepted(task)
        self.trace.emit(Event.CONFIG, task.id, task.uid, text=f"{kind}: {len(text)} bytes")

    def check_constraint(self, task: Task, kind: str, text: str) -> str:
        """The grammar ``text`` written to ``kind`` makes ("" for none); refused why not."""
        if task.state is not State.DRAFT:
            raise self.reject(task.uid, task, Busy(
                f"task {task.id} is {task.state}: {kind} is writable while a draft"))
        try:
            if not text.strip():
                grammar = ""
            elif kind == "schema":
                grammar = grammars.from_schema(text)
            else:
                grammars.check(text)
                grammar = text
        except grammars.GrammarError as e:
            task.bad_constraint = f"{kind}: {e}"
            raise self.reject(task.uid, task, BadInput(task.bad_constraint)) from e
        task.bad_constraint = ""
        return grammar

    def control(self, task: Task, text: str) -> None:
        """Apply one command written to tasks/ID/ctl (``COMMANDS``)."""
        try:
            command = ctl.parse(COMMANDS, f"tasks/{task.id}/ctl", text)
            if command.verb == "priority":
                self._set_priority(task, command)
        except AxfsError as e:
            raise self.reject(task.uid, task, e) from e
        if command.verb == "kill":
            journaled = task.state is not State.DRAFT and not task.finished
            self.kill(task)
            if self.keeper is not None and journaled:  # on disk before the write returns
                try:
                    self.keeper.sync()
                except AxfsError as e:
                    raise self.reject(task.uid, task, e) from e
        self.refusals.accepted(task)

    def _set_priority(self, task: Task, command: ctl.Command) -> None:
        priority = parse_setting("priority", command.args[0], command.where)
        assert isinstance(priority, int)
        task.config.priority = priority
        self.trace.emit(Event.PRIORITY, task.id, task.uid, priority=priority)

    def kill(self, task: Task, reason: str = "") -> None:
        """End ``task`` killed; ``reason``, where the kill was not asked for in the tree (an
        HTTP client that left), goes to the trace and the task's error."""
        if task.finished:
            return
        why = {"reason": reason} if reason else {}
        self.trace.emit(Event.KILL, task.id, task.uid, state=task.state, tokens=task.num_generated,
                        **why)
        self.loading.finish(task, State.KILLED, Finish.KILLED, reason)

    def remove(self, task: Task, reason: str = "rm") -> None:
        """``rm -r tasks/ID``: kill the task if it still runs, then forget it. ``rm`` of a
        submitted task is on disk before it returns (refused if it cannot be)."""
        if self.keeper is not None:
            try:
                self.keeper.removed(task, durable=reason == "rm" and task.state is not State.DRAFT)
            except AxfsError as e:
                raise self.reject(task.uid, task, e) from e
        self.kill(task)
        self.table.drop(task)
        self.refusals.forget(task)
        self.trace.emit(Event.REMOVE, task.id, task.uid, reason=reason)
        for told in self.on_remove:
            told(task, reason)
