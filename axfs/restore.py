"""Restoring: the journaled tasks back in the tree when it is mounted again (see
docs/tree.md, "Nothing lost"). Finished tasks come back as they were; unfinished ones run on from
the tokens they had generated, once their model is loaded; a fork still waiting for
its parent waits again. The journal's side is axfs.persist.
"""

from __future__ import annotations

import time

from axfs import tokens
from axfs.loading import Loading
from axfs.persist import Keeper
from axfs.runtime import Runtime
from axfs.submit import Submissions
from axfs.task import State, Task
from axfs.tasktable import TaskTable
from axfs.timeline import Finish
from axfs.trace import Event


class Restore:
    def __init__(self, table: TaskTable, loading: Loading, submissions: Submissions) -> None:
        self.table = table
        self.loading = loading
        self.submissions = submissions
        self.trace = loading.trace

    def restore(self, keeper: Keeper) -> None:
        """Bring back every task ``keeper``'s journal holds."""
        restored, records = keeper.load(self.trace)
        for task, _ in restored:
            self.table.adopt(task)
        waiting: list[Task] = []
        unfinished = [(task, generated) for task, generated in restored if not task.finished]
        for task, generated in unfinished:
            if task.parent and not task.prompt_tokens:
                waiting.append(task)  # a fork that was waiting for its parent
                continue
            if task.config.model not in self.loading.registry.entries:
                self.loading.finish(task, State.FAILED, Finish.ERROR,
                                    f"model {task.config.model} is no longer registered")
                continue
            sha = self.loading.sha_for(task)
            if task.model_sha and sha and task.model_sha != sha:
                self._model_changed(keeper, task, sha)
                continue
            self.resume(task, generated)
        for task in waiting:
            self.resume_fork(task)
        self.trace.emit(Event.JOURNAL_LOAD, tasks=len(restored), records=records,
                        resumed=len(unfinished))

    def resume(self, task: Task, generated: list[int]) -> None:
        """Queue an unfinished journaled task, with the tokens it had generated: its
        text is rebuilt from them and it runs on from there (once its model is loaded).
        A remote task has its text from the journal, and is sent again with it."""
        self.loading.when_loaded(task.config.model,
                                 lambda runtime: self._resume(task, generated, runtime))

    def _resume(self, task: Task, generated: list[int], runtime: Runtime) -> None:
        if task.finished:
            return
        if runtime.seq_limit is None:  # remote: the journal kept the text (make_task)
            task.output_tokens = list(generated)
        else:
            for token in generated:
                if task.finished:
                    break
                task.add_token(token, runtime.piece(token), runtime.is_eog(token),
                               limit_reached=False)
            tokens.keep(task, len(task.output_tokens))  # the records of the tokens taken again
        task.deterministic = task.deterministic and runtime.deterministic
        self.trace.emit(Event.RESUME, task.id, task.uid, tokens=len(generated))
        reason = task.finish_reason
        if reason is not None:  # it ended among the tokens journaled: its end was not
            runtime.end(task, task.state, reason)
            return
        task.state = State.QUEUED
        task.waiting_since = time.time()
        task.stepwise_until = task.num_history - 1
        runtime.add(task)

    def resume_fork(self, task: Task) -> None:
        parent = self.table.tasks.get(task.parent)
        if parent is None:
            self.loading.finish(task, State.FAILED, Finish.ERROR,
                                f"task {task.parent}, which this one continues, is gone")
        elif parent.finished:
            self.loading.when_loaded(
                task.config.model, lambda runtime: self.submissions.start_fork(task, parent, runtime))
        else:
            self.submissions.wait_for_parent(task, parent)

    def _model_changed(self, keeper: Keeper, task: Task, sha: str) -> None:
        """An unfinished task of another model file: a plain prompt starts again from its
        text; a fork, whose context is tokens of the old model, fails."""
        if task.parent:
            self.loading.finish(task, State.FAILED, Finish.ERROR,
                                f"the model file changed since this fork was submitted "
                                f"(sha256 {task.model_sha[:16]}..., now {sha[:16]}...)")
            return

        def again(runtime: Runtime) -> None:
            task.model_sha = runtime.sha
            task.deterministic = runtime.deterministic
            task.prompt_tokens = runtime.tokenize(task.text_for_model, special=task.config.chat)
            keeper.submitted(task, durable=False)
            self.resume(task, [])

        self.loading.when_loaded(task.config.model, again)
