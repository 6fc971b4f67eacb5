"""Replay: a task's timeline, and running it again to show the same tokens come out.

Writing ``run`` to ``replay/ID/ctl`` queues a hidden copy of the finished task ID: the
same prompt tokens, parameters and seed, on the model file it ran on (checked by
sha256). The copy runs *alone* (no other sequence in its steps) and computes its whole
prompt (no prefix copied from another sequence), and ``replay/ID/result`` then reads
``match`` or where the first token differs. A task that ran in deterministic mode
(drivers.determinism) has the same tokens whatever shared its steps, so its replay
matches; otherwise llama.cpp's batched steps do not give bit-identical logits for a
sequence decoded alone and inside a batch (docs/design.md, Replay), so a task that ran
in batches can replay differently, and the result says so (docs/tree.md, Replay). A
replay runs in the mode its task ran in: a task of the other mode is a mismatch, as a
changed model file is (docs/tree.md, Replay).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from axfs import ctl
from axfs.errors import Busy
from axfs.runtime import LocalRuntime
from axfs.task import Task
from axfs.timeline import GENERATED, Steps
from axfs.trace import Event, Trace

COMMANDS = (ctl.Verb("run"),)  # replay/ID/ctl


@dataclass(slots=True)
class Replay:
    original: Task
    runner: Task | None = None
    result: str = ""
    runs: int = 0


class Replays:
    """The replays of tasks: ``local`` finds the local runtime of a model, if loaded."""

    def __init__(self, trace: Trace, local: Callable[[str], LocalRuntime | None]) -> None:
        self.trace = trace
        self.local = local
        self._replays: dict[str, Replay] = {}
        self._running: dict[int, Replay] = {}  # id(runner) -> its replay

    def result(self, task: Task) -> str:
        replay = self._replays.get(task.id)
        return replay.result if replay is not None else ""

    def control(self, task: Task, text: str) -> None:
        ctl.parse(COMMANDS, f"replay/{task.id}/ctl", text)  # run, the only command
        self.run(task)

    def run(self, task: Task) -> None:
        if not task.finished:
            raise Busy(f"task {task.id} is {task.state.value}: replay a task that has ended")
        if not task.prompt_tokens:
            raise Busy(f"task {task.id} never ran: there is nothing to replay")
        replay = self._replays.setdefault(task.id, Replay(task))
        if replay.runner is not None:
            raise Busy(f"a replay of task {task.id} is running")
        replay.runs += 1
        runtime = self.local(task.config.model)
        if runtime is None:
            replay.runs -= 1
            raise Busy(f"model {task.config.model} is not loaded here: replay runs on a local "
                       f"model (write load to models/{task.config.model}/ctl first)")
        if task.model_sha and runtime.sha and task.model_sha != runtime.sha:
            replay.result = (f"mismatch model: task {task.id} ran on a model file with sha256 "
                             f"{task.model_sha}, the mounted one has {runtime.sha}\n")
            self.trace.emit(Event.REPLAY, task.id, task.uid, result="mismatch", why="model")
            return
        if task.deterministic != runtime.deterministic:
            replay.result = (f"mismatch mode: task {task.id} ran {_mode(task.deterministic)}, "
                             f"model {task.config.model} is now loaded "
                             f"{_mode(runtime.deterministic)} (see its info)\n")
            self.trace.emit(Event.REPLAY, task.id, task.uid, result="mismatch", why="mode")
            return
        config = task.config.copy()
        if task.finish_reason not in GENERATED:
            config.max_tokens = max(1, task.num_generated)  # killed or failed: as far as it got
        runner = Task(f"replay-{task.id}-{replay.runs}", task.uid, task.gid, config)
        runner.exclusive = True
        runner.submit(task.prompt, list(task.prompt_tokens))
        replay.runner = runner
        replay.result = "running\n"
        self._running[id(runner)] = replay
        self.trace.emit(Event.REPLAY, task.id, task.uid, run=replay.runs, tokens=task.num_generated)
        runtime.engine.add(runner)

    def ended(self, runner: Task) -> None:
        replay = self._running.pop(id(runner), None)
        if replay is None:
            return
        replay.runner = None
        replay.result = self._compare(replay.original, runner)
        self.trace.emit(Event.REPLAY, replay.original.id, runner.uid,
                               result=replay.result.split()[0],
                               seconds=round(time.time() - runner.submitted_at, 3))

    def _compare(self, original: Task, runner: Task) -> str:
        if runner.error:
            return f"failed: {runner.error}\n"
        want, got = original.output_tokens, runner.output_tokens
        m = original.config.model
        for i, (a, b) in enumerate(zip(want, got, strict=False)):
            if a != b:
                return (f"mismatch token {i}: expected {self._piece(a, m)} ({a}), got "
                        f"{self._piece(b, m)} ({b}){self._batched(original)}\n")
        if len(want) != len(got):
            i = min(len(want), len(got))
            return (f"mismatch token {i}: expected {len(want)} tokens, got {len(got)}"
                    f"{self._batched(original)}\n")
        return f"match {len(want)} tokens\n"

    def _piece(self, token: int, model: str) -> str:
        runtime = self.local(model)
        text = runtime.piece(token).decode("utf-8", "replace") if runtime else "?"
        return repr(text)

    @staticmethod
    def _batched(task: Task) -> str:
        if task.deterministic:
            return " (the task ran in deterministic mode: see docs/tree.md, Replay)"
        most = max((e.batch_max for e in task.timeline if isinstance(e, Steps)), default=1)
        return f" (the task ran in batches of up to {most} sequences; the replay ran alone)" \
            if most > 1 else ""


def _mode(deterministic: bool) -> str:
    return "in deterministic mode" if deterministic else "not in deterministic mode"


def timeline(task: Task, model_sha: str) -> str:
    """The text of replay/ID/timeline."""
    head = [f"task {task.id}", f"uid {task.uid}", f"model_sha256 {task.model_sha or model_sha}",
            f"prompt_tokens {len(task.prompt_tokens)}", f"generated_tokens {task.num_generated}",
            f"deterministic {'yes' if task.deterministic else 'no'}",
            f"state {task.state.value}", ""]
    rows = []
    for e in task.timeline:
        if isinstance(e, Steps):
            batch = f"{e.batch_min}" if e.batch_min == e.batch_max else f"{e.batch_min}..{e.batch_max}"
            rows.append(f"{e.at:10.1f} - {e.until_ms:.1f} ms {e.kind} steps={e.steps} "
                        f"tokens={e.tokens} batch={batch}")
        else:
            extra = "".join(f" {key}={v}" for key, v in e.details.items())
            rows.append(f"{e.at:10.1f} ms {e.kind}{extra}")
    return "\n".join(head + rows) + "\n"
