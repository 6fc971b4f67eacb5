"""One unit of work: a prompt, its parameters and the text generated for it.

A Task is a state machine (draft -> queued -> running -> done | failed | killed)
with counters; the engine feeds it tokens and it turns them into whole UTF-8
characters, honours stop strings and wakes the readers of its stream.
"""

from __future__ import annotations

import codecs
import dataclasses
import enum
import time

import trio

from axfs.config import TaskConfig
from axfs.timeline import Entry, Finish, Mark, StepKind, Steps
from axfs.trace import Event
from drivers.base import Sampling


class State(enum.StrEnum):
    DRAFT = "draft"  # made with mkdir; config and prompt still being written
    QUEUED = "queued"
    RUNNING = "running"
    PREEMPTED = "preempted"  # runnable, waiting for its turn with its progress kept
    DONE = "done"
    FAILED = "failed"
    KILLED = "killed"


FINAL = frozenset({State.DONE, State.FAILED, State.KILLED})
_EOS, _LENGTH, _CONTEXT = Finish.EOS, Finish.LENGTH, Finish.CONTEXT  # per token: looked up once


class Task:
    def __init__(self, task_id: str, uid: int, gid: int, config: TaskConfig) -> None:
        self.id = task_id
        self.uid = uid
        self.gid = gid
        self.config = config
        self.state = State.DRAFT
        self.prompt = ""
        self.prompt_tokens: list[int] = []
        self.output = bytearray()  # the published stream: whole UTF-8 characters
        self.output_tokens: list[int] = []
        self.records = bytearray()  # with config logprobs: a token record each (axfs.tokens)
        self.error = ""
        self.finish_reason: Finish | None = None
        self.seq: int | None = None  # the model sequence slot while admitted
        self.num_cached = 0  # tokens of prompt + output already in the KV cache
        self.kv_reserved = 0  # cells reserved for this task while admitted
        self.saved: object | None = None  # the driver's saved state while preempted
        self.prefix_reused = 0  # prompt tokens copied from another sequence, not computed
        self.parent = ""  # the task this one was forked from
        self.model_sha = ""  # sha256 of the model file it was submitted to
        self.deterministic = False  # ran only on a batch-invariant model (drivers.determinism)
        self.exclusive = False  # runs alone in its steps (a replay)
        self.isolate = False  # was in a step that failed: runs alone until a step works
        self.stepwise_until = 0  # recompute up to here as first computed (see Scheduler)
        self.timeline: list[Entry] = []  # what happened to it (replay/ID/timeline)
        self.follow_up: list[int] = []  # a fork's own tokens, appended to its parent's text
        self.model_prompt = ""  # the text the model is given, where it is not the prompt:
        # the prompt in the chat template, or a fork's whole context (see Kernel._queue)
        self.bad_constraint = ""  # why the last schema or grammar written did not compile
        self.remote = False  # its text comes from a remote engine (axfs.remote), token ids not
        self.turns: list[tuple[str, str]] = []  # a remote chat's (role, text) turns: sent as
        # they are, the server applying its own template (see Submissions._queue)
        self.num_preempted = 0
        self.num_processed = 0  # tokens run through the model for it (prefill and decode)
        self.processed_at_start = 0  # num_processed when it was last admitted
        self.generated_at_start = 0  # tokens generated when it was last admitted
        self.waited_s = 0.0  # time runnable but not admitted, before the current wait
        self.waiting_since = 0.0  # when the current wait began (0: not waiting)
        self.created_at = time.time()
        self.submitted_at = 0.0
        self.started_at = 0.0
        self.first_token_at = 0.0
        self.finished_at = 0.0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""  # decoded text not yet published: it may begin a stop string
        self.updated_at = self.created_at
        self._changed = trio.Event()
        self._watched = False  # someone took ``changed`` since the last notify
        self._ended: trio.Event | None = None  # made for the first who waits for the end

    # -- derived -------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    @property
    def num_generated(self) -> int:
        return len(self.output_tokens)

    @property
    def num_history(self) -> int:
        """Tokens of the sequence so far: the prompt and everything generated."""
        return len(self.prompt_tokens) + len(self.output_tokens)

    def pending(self) -> list[int]:
        """Tokens to feed before the next sample: the whole prompt at first, then the
        last generated token each step (and after a preemption that dropped the KV,
        everything again)."""
        n_prompt = len(self.prompt_tokens)
        if self.num_cached >= n_prompt:  # the usual case: no copy of the prompt
            return self.output_tokens[self.num_cached - n_prompt :]
        return self.prompt_tokens[self.num_cached :] + self.output_tokens

    def sampling(self) -> Sampling:
        """How the driver samples for it: as its config says, with the last tokens of its
        sequence, which the penalties count as seen (llama-server counts the prompt too)."""
        sampling = self.config.sampling()
        if not sampling.penalized:
            return sampling
        history = self.prompt_tokens + self.output_tokens
        return dataclasses.replace(sampling, recent=tuple(history[-sampling.repeat_last_n:]))

    @property
    def num_prompt_cached(self) -> int:
        return min(self.num_cached, len(self.prompt_tokens))

    @property
    def kv_cells(self) -> int:
        """Cells this task's sequence holds in the KV cache now."""
        return self.num_cached if self.seq is not None else 0

    @property
    def waited_total_s(self) -> float:
        now = time.time()
        return self.waited_s + (now - self.waiting_since if self.waiting_since else 0.0)

    def mark(self, event: Event, **details: object) -> None:
        """Add ``event`` to the timeline."""
        base = self.submitted_at or self.created_at
        self.timeline.append(Mark(round((time.time() - base) * 1000, 1), event, details))

    def mark_step(self, kind: StepKind, batch: int, tokens: int, now: float | None = None) -> None:
        """Count one step it ran in (ended at ``now``, time.time()): consecutive steps of
        one kind share a timeline entry."""
        at = round(((now or time.time()) - (self.submitted_at or self.created_at)) * 1000, 1)
        last = self.timeline[-1] if self.timeline else None
        if type(last) is Steps and last.kind is kind:
            last.until_ms = at
            last.steps += 1
            last.tokens += tokens
            if batch < last.batch_min:
                last.batch_min = batch
            elif batch > last.batch_max:
                last.batch_max = batch
            return
        self.timeline.append(Steps(at, kind, at, 1, tokens, batch, batch))

    # -- waking readers ------------------------------------------------------------

    @property
    def changed(self) -> trio.Event:
        """An event set at the next change; take it before checking, then wait on it."""
        self._watched = True
        return self._changed

    @property
    def ended(self) -> trio.Event:
        """An event set when the task finishes (a reader holding back for more text waits
        on it, not on every token)."""
        if self._ended is None:
            self._ended = trio.Event()
            if self.finished:
                self._ended.set()
        return self._ended

    def notify(self, now: float | None = None) -> None:
        self.updated_at = now or time.time()
        if self._watched:  # a new event only when someone may wait on the old one
            self._watched = False
            event, self._changed = self._changed, trio.Event()
            event.set()

    # -- transitions -----------------------------------------------------------------

    def context(self) -> list[int]:
        """The tokens a fork of this task continues from: its prompt and what it generated,
        less a final end-of-generation token."""
        out = self.output_tokens
        if out and self.finish_reason is Finish.EOS:
            out = out[:-1]
        return self.prompt_tokens + out

    def submit(self, prompt: str, tokens: list[int]) -> None:
        self.prompt = prompt
        self.prompt_tokens = tokens
        self.config.fix_seed()
        self.state = State.QUEUED
        self.submitted_at = self.waiting_since = time.time()
        self.notify()

    def start(self, seq: int, kv_reserved: int) -> None:
        now = time.time()
        self.seq = seq
        self.kv_reserved = kv_reserved
        self.state = State.RUNNING
        self.started_at = self.started_at or now
        if self.waiting_since:
            self.waited_s += now - self.waiting_since
            self.waiting_since = 0.0
        self.processed_at_start = self.num_processed
        self.generated_at_start = len(self.output_tokens)
        self.notify()

    def preempt(self, keep_kv: bool) -> None:
        """Back to waiting; the scheduler has taken its sequence slot and cells."""
        self.state = State.PREEMPTED
        self.num_preempted += 1
        self.waiting_since = time.time()
        if not keep_kv:
            self.num_cached = 0
        self.notify()

    def finish(self, state: State, reason: Finish, error: str = "") -> None:
        """End the task; what was held back for a possible stop string is published."""
        if self.finished:
            return
        if state is State.DONE:
            self._publish(self._held + self._decoder.decode(b"", final=True))
        self._held = ""
        self.state = state
        self.finish_reason = reason
        if error:
            self.error = error
        self.finished_at = time.time()
        if self.waiting_since:
            self.waited_s += self.finished_at - self.waiting_since
            self.waiting_since = 0.0
        self.saved = None
        self.notify()
        if self._ended is not None:
            self._ended.set()

    # -- generated tokens ------------------------------------------------------------

    def add_token(self, token: int, piece: bytes, eog: bool, limit_reached: bool) -> None:
        """Apply one sampled token: end of generation, text, stop strings, limits."""
        self.take(token, time.time())
        ending = self.ends_with(eog, limit_reached)
        if ending:
            self.end_with(ending, piece)
        elif not self.add_piece(piece):
            self.notify()

    # The engine applies a step in two passes (see Engine): ``take`` and ``ends_with``
    # for every token at once, then the text (``add_piece``), which may wait for the
    # next step to be under way.

    def take(self, token: int, now: float) -> None:
        """Count one sampled token (its text comes with ``add_piece``)."""
        if not self.output_tokens:
            self.first_token_at = now
        self.output_tokens.append(token)

    def ends_with(self, eog: bool, limit_reached: bool) -> Finish | None:
        """Why the token just taken ends the task, known without its text: EOS, LENGTH,
        CONTEXT, or None (a stop string is found only in the text)."""
        if eog:
            return _EOS
        if len(self.output_tokens) >= self.config.max_tokens:
            return _LENGTH
        return _CONTEXT if limit_reached else None

    def end_with(self, ending: Finish, piece: bytes) -> None:
        """Finish for ``ending`` (from ``ends_with``): the last token's text first, unless
        it is the end-of-generation token (a stop string in that text wins)."""
        if ending is _EOS or not self.add_piece(piece):
            self.finish(State.DONE, ending)

    def add_piece(self, piece: bytes) -> bool:
        """Publish a token's text, less what may begin a stop string; True when a stop
        string was found (the task is then done, its text cut before it)."""
        held = self._held + self._decoder.decode(piece)
        if not self.config.stop:
            if held:
                self.output += held.encode("utf-8")
                self._held = ""
            return False
        self._held = held
        cut = self._stop_at()
        if cut is not None:
            self._held = self._held[:cut]
            self.finish(State.DONE, Finish.STOP)
            return True
        keep = self._stop_prefix_len()
        self._publish(self._held[: len(self._held) - keep])
        self._held = self._held[len(self._held) - keep :]
        return False

    def add_text(self, text: str) -> None:
        """Apply a streamed piece of text from a remote engine, which applies the stop
        strings and limits itself; each piece counts as one token (id -1)."""
        if not self.output_tokens:
            self.first_token_at = time.time()
        self.output_tokens.append(-1)
        self._publish(text)
        self.notify()

    @property
    def text_for_model(self) -> str:
        return self.model_prompt or self.prompt

    def _publish(self, text: str) -> None:
        if text:
            self.output += text.encode("utf-8")

    def _stop_at(self) -> int | None:
        hits = [i for s in self.config.stop if s and (i := self._held.find(s)) >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the held text that begins some stop string."""
        best = 0
        for s in self.config.stop:
            for n in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:n]):
                    best = n
                    break
        return best
