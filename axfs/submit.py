"""Submitting tasks: the checks a submission must pass, its record in the journal, and
handing it to its model (``echo > tasks/new``, a draft's ``prompt``, ``fork``).

A submission is accepted once it is on disk (axfs.persist) and only then queued; every
refusal is recorded (axfs.refusals) before it is raised.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

import trio

from axfs.config import TaskConfig
from axfs.errors import AxfsError, BadInput, Busy, NoSpace
from axfs.loading import Loading
from axfs.persist import Keeper
from axfs.prompts import Prompts
from axfs.refusals import Refusals
from axfs.runtime import Runtime
from axfs.task import State, Task
from axfs.tasktable import TaskTable
from axfs.timeline import Finish
from axfs.trace import Event

# A prompt this short is tokenized in the trio thread: it takes about 0.2 ms (Gemma's
# vocabulary, 0.8 us a byte here), less than handing it to a worker thread and back
# while the tree is busy (0.3 to 0.6 ms measured in a 64-task burst). Longer ones go to
# a worker thread, so that the tree goes on answering meanwhile.
INLINE_TOKENIZE_CHARS = 256


class Submissions:
    def __init__(self, table: TaskTable, loading: Loading, prompts: Prompts, refusals: Refusals,
                 keeper: Keeper | None) -> None:
        self.table = table
        self.loading = loading
        self.prompts = prompts
        self.refusals = refusals
        self.reject = refusals.reject
        self.quota = table.quota
        self.keeper = keeper
        self.trace = loading.trace
        self._forks: dict[str, list[Task]] = {}  # parent id -> forks waiting for it to end

    # -- checks ------------------------------------------------------------------------

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

    def check_prompt_write(self, uid: int, task: Task | None, data: bytes, before: int,
                           utf8: codecs.IncrementalDecoder, fork: bool = False,
                           submitted: bool = False) -> None:
        """One write of a prompt through an open file: to tasks/new (``task`` None), to a
        draft's prompt, or (``fork``) a follow-up to ``task``. ``before``: bytes written
        through it already (at the first write, the quota is checked); ``submitted``: the
        open file has submitted its prompt already. A refusal is recorded and raised."""
        if submitted or (task is not None and not fork and task.state is not State.DRAFT):
            raise self.reject(uid, task, Busy("the prompt was already submitted"))
        if fork and task is not None:
            self.check_forkable(task, uid)
        if task is not None and not fork and task.bad_constraint:
            raise self.reject(uid, task, BadInput(
                f"the task's {task.bad_constraint} (write a good one, or empty it)"))
        if not before:  # over a per-user limit: refused at the first write, not at close
            self.check_quota(uid, task, task.config if task else None, len(data))
        try:
            self.prompts.check_bytes(data, before, uid, utf8)
        except AxfsError as e:
            raise self.reject(uid, task, e) from e

    def check_forkable(self, parent: Task, uid: int) -> None:
        if parent.state is State.DRAFT:
            raise self.reject(uid, parent, Busy(
                f"task {parent.id} has no prompt yet: there is nothing to fork"))

    def _prompt_text(self, uid: int, task: Task | None, data: bytes) -> str:
        try:
            return self.prompts.text(uid, data)
        except AxfsError as e:
            raise self.reject(uid, task, e) from e

    # -- submitting --------------------------------------------------------------------

    async def submit(self, task: Task, data: bytes, turns: Sequence[tuple[str, str]] = ()) -> None:
        """Queue the draft ``task`` with ``data`` as its prompt; a chat's whole conversation,
        where it has more than the prompt as one user turn, comes as (role, text) ``turns``
        (``POST /v1/chat/completions``: axfs.http)."""
        if task.state is not State.DRAFT:
            raise self.reject(task.uid, task, Busy(f"task {task.id} was already submitted"))
        if turns and not task.config.chat:
            raise self.reject(task.uid, task, BadInput("a conversation needs chat on"))
        self.check_quota(task.uid, task, task.config)
        await self._queue(task, self._prompt_text(task.uid, task, data), list(turns))
        self.refusals.accepted(task)

    async def submit_new(self, uid: int, gid: int, data: bytes) -> Task:
        """``echo PROMPT > tasks/new``: a new task with default parameters, queued."""
        text = self._prompt_text(uid, None, data)
        self.check_quota(uid, None, None)
        task = self.table.create(uid, gid)
        try:
            await self._queue(task, text)
        except AxfsError as e:
            # Its model could not be loaded: the task shows why (tasks/latest/error).
            self.table.set_latest(task)
            task.prompt = text
            task.finish(State.FAILED, Finish.ERROR, str(e))
            raise
        return task

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
            runtime = await self.loading.runtime(parent.config.model)
        except AxfsError as e:
            raise self.reject(uid, parent, e) from e
        task = self.table.create(uid, gid)
        self.refusals.accepted(parent)
        task.config = parent.config.copy()
        task.parent = parent.id
        task.prompt = text
        self.table.set_latest(task)
        try:
            if parent.finished:
                self.start_fork(task, parent, runtime, durable=True)
                return task
            task.submit(text, [])
            task.model_sha = runtime.sha
            task.deterministic = runtime.deterministic
            self.record(task)
        except AxfsError as e:  # not recorded: a failed task, gone after a restart
            task.finish(State.FAILED, Finish.ERROR, str(e))
            raise
        self.wait_for_parent(task, parent)
        self.trace.emit(Event.FORK, task.id, uid, parent=parent.id, waiting="yes")
        return task

    def wait_for_parent(self, task: Task, parent: Task) -> None:
        """Start fork ``task`` once ``parent``, which has not ended, ends."""
        self._forks.setdefault(parent.id, []).append(task)

    def parent_ended(self, parent: Task) -> None:
        """``parent`` ended: start the forks waiting for it."""
        children = [c for c in self._forks.pop(parent.id, []) if not c.finished]

        def start_children(runtime: Runtime) -> None:
            for child in children:
                self.start_fork(child, parent, runtime)

        if children:
            self.loading.when_loaded(parent.config.model, start_children)

    def start_fork(self, task: Task, parent: Task, runtime: Runtime, durable: bool = False) -> None:
        """Queue a fork whose parent has ended; ``durable``: the write that made it waits
        for its record (a fork that waited for its parent was recorded then)."""
        if parent.state is State.FAILED:
            error = f"task {parent.id}, which this one continues, failed: {parent.error}"
            self.trace.emit(Event.ERROR, task.id, task.uid, reason=error)
            self.loading.finish(task, State.FAILED, Finish.ERROR, error)
            return
        try:
            added = self.prompts.follow_up(parent, task.prompt, runtime) \
                if task.config.chat and not parent.turns else task.prompt
        except AxfsError as e:
            self.trace.emit(Event.ERROR, task.id, task.uid, reason=str(e))
            self.loading.finish(task, State.FAILED, Finish.ERROR, str(e))
            return
        if parent.turns:  # a chat the server templates: the fork is its next turn
            task.turns = [*parent.turns, ("assistant", parent.output.decode("utf-8", "replace")),
                          ("user", task.prompt)]
            task.submit(task.prompt, [])
        elif runtime.seq_limit is None:  # remote: the context goes as text
            task.model_prompt = parent.text_for_model + parent.output.decode("utf-8", "replace") \
                + added
            task.submit(task.prompt, [])
        else:
            task.follow_up = runtime.tokenize(added, bos=False, special=task.config.chat)
            task.submit(task.prompt, parent.context() + task.follow_up)
        task.model_sha = runtime.sha
        task.deterministic = runtime.deterministic
        if durable:
            self.record(task)
        elif self.keeper is not None:
            self.keeper.submitted(task, durable=False)
        self.trace.emit(Event.FORK, task.id, task.uid, parent=parent.id,
                        context_tokens=len(task.prompt_tokens))
        self._enqueue(task, runtime)

    async def _queue(self, task: Task, text: str, turns: list[tuple[str, str]] | None = None) -> None:
        turns = turns or [("user", text)]
        try:
            runtime = await self.loading.runtime(task.config.model)
            if runtime.seq_limit is None:  # remote: its model may have become so since
                task.config.check_remote()
            if task.config.chat and self.prompts.server_templates(runtime):
                task.turns = turns
            elif task.config.chat:
                task.model_prompt = self.prompts.chat(turns, runtime)
            model_text = task.model_prompt or text
            if len(model_text) <= INLINE_TOKENIZE_CHARS:
                tokens = runtime.tokenize(model_text, special=task.config.chat)
            else:
                tokens = await trio.to_thread.run_sync(
                    lambda: runtime.tokenize(model_text, special=task.config.chat))
        except AxfsError as e:
            task.model_prompt, task.turns = "", []
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
                task.turns = []
            raise self.reject(task.uid, task, e) from e
        self.table.set_latest(task)
        if not task.finished:  # not killed while its record was written
            self._enqueue(task, runtime)

    def record(self, task: Task) -> None:
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
        self.trace.emit(Event.SUBMIT, task.id, task.uid, prompt_tokens=len(tokens),
                        max_tokens=task.config.max_tokens, model=task.config.model)
        task.mark(Event.SUBMIT, prompt_tokens=len(tokens), max_tokens=task.config.max_tokens)
        self._add(task, runtime)

    def _add(self, task: Task, runtime: Runtime) -> None:
        """Hand a submitted task to its model's runtime (the one loaded now, should
        ``runtime`` have been unloaded meanwhile), or fail it if its prompt cannot fit."""
        if self.loading.runtimes.get(runtime.name) is not runtime:
            self.loading.when_loaded(runtime.name, lambda again: self._add(task, again))
            return
        tokens = task.prompt_tokens
        limit = runtime.seq_limit
        if limit is not None and len(tokens) >= limit:
            error = NoSpace(f"prompt is {len(tokens)} tokens; a task's context holds "
                            f"{limit} tokens with room for at least one more")
            self.trace.emit(Event.ERROR, task.id, task.uid, reason=str(error))
            runtime.end(task, State.FAILED, Finish.ERROR, str(error))
            return
        runtime.add(task)
