"""Per-user limits: the accounting and the checks behind ``users/UID``.

Every user has the same limits unless the mount gives a uid its own. A request over a
limit raises at once (``QuotaExceeded`` for EDQUOT, ``TooLarge`` for EFBIG,
``ParameterTooLarge`` for E2BIG). The kernel writes the reason of every refused request
to the trace and the task's ``error``, and tells ``refused`` here, for the user's
``users/UID`` file (the last few reasons).

Tokens are counted as the scheduler charges them (prompt and generated tokens the
model processed for the user's tasks). They are sampled when a limit is checked or the
user's file is read, and what was processed between two samples is spread evenly over
the time between them, in one-minute buckets; an hour is the last 60 buckets.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from axfs.config import TaskConfig
from axfs.errors import ParameterTooLarge, QuotaExceeded, TooLarge
from axfs.task import State, Task

WINDOW_S = 3600
BUCKET_S = 60
REFUSALS_KEPT = 5
ACTIVE = frozenset({State.QUEUED, State.RUNNING, State.PREEMPTED})


@dataclass(slots=True, frozen=True)
class Limits:
    """One user's limits (the defaults are in docs/tree.md, "Limits")."""

    tasks: int = 256  # tasks queued, running or preempted at once
    prompt_bytes: int = 1 << 20  # bytes of one prompt (or fork text)
    max_tokens: int = 1_000_000  # the most a task's max_tokens may be (config's own most)
    tokens_per_hour: int = 0  # tokens processed for the user in any hour; 0: no limit


# key -> (least, most) a mount may set
RANGES: dict[str, tuple[int, int]] = {
    "tasks": (1, 1_000_000),
    "prompt_bytes": (1, 64 << 20),
    "max_tokens": (1, 1_000_000),
    "tokens_per_hour": (0, 10**12),
}


def parse_limits(specs: list[str]) -> tuple[Limits, dict[int, Limits]]:
    """``--limit`` values: ``KEY=N`` sets a limit for everyone, ``UID:KEY=N`` for one uid
    (on top of everyone's). Returns everyone's limits and each named uid's; ValueError
    says what is wrong."""
    everyone: dict[str, int] = {}
    own: dict[int, dict[str, int]] = {}
    for spec in specs:
        who, _, setting = spec.rpartition(":")
        key, eq, raw = setting.partition("=")
        if not eq:
            raise ValueError(f"limit {spec!r}: expected KEY=N or UID:KEY=N")
        if key not in RANGES:
            raise ValueError(f"limit {spec!r}: unknown key {key!r} (keys: {', '.join(RANGES)})")
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"limit {spec!r}: {raw!r} is not an integer") from None
        lo, hi = RANGES[key]
        if not lo <= value <= hi:
            raise ValueError(f"limit {spec!r}: {value} is outside {lo}..{hi}")
        if not who:
            everyone[key] = value
            continue
        if not who.isdigit():
            raise ValueError(f"limit {spec!r}: {who!r} is not a uid")
        own.setdefault(int(who), {})[key] = value
    base = Limits(**everyone)
    return base, {uid: dataclasses.replace(base, **keys) for uid, keys in own.items()}


@dataclass(slots=True)
class _User:
    tasks: set[Task] = field(default_factory=set)  # drafts and active ones; ended ones pruned
    seen_tokens: int = 0  # the scheduler's count at the last sample
    seen_at: float = 0.0
    buckets: dict[int, float] = field(default_factory=dict)  # minute -> tokens
    refusals: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=REFUSALS_KEPT))
    num_refused: int = 0


class Quota:
    def __init__(self, limits: Limits | None = None, per_uid: dict[int, Limits] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.limits = limits or Limits()
        self.per_uid = dict(per_uid or {})
        self.clock = clock
        self.usage: Callable[[int], int] = lambda uid: 0  # tokens charged to uid so far
        self._users: dict[int, _User] = {}

    def limits_for(self, uid: int) -> Limits:
        return self.per_uid.get(uid, self.limits)

    def _user(self, uid: int) -> _User:
        user = self._users.get(uid)
        if user is None:
            user = self._users[uid] = _User(seen_tokens=self.usage(uid), seen_at=self.clock())
        return user

    def users(self) -> list[int]:
        """The uids with a file in ``users/``: those who made a task or were refused."""
        return sorted(self._users)

    # -- accounting ------------------------------------------------------------------

    def track(self, task: Task) -> None:
        """A new task of ``task.uid``; a default max_tokens over the limit is lowered to it."""
        self._user(task.uid).tasks.add(task)
        self.fit(task.uid, task.config)

    def fit(self, uid: int, config: TaskConfig) -> TaskConfig:
        """Default parameters for ``uid``: max_tokens lowered to the user's limit."""
        config.max_tokens = min(config.max_tokens, self.limits_for(uid).max_tokens)
        return config

    def active(self, uid: int) -> int:
        """The user's tasks queued, running or preempted now."""
        user = self._user(uid)
        user.tasks = {t for t in user.tasks if not t.finished}
        return sum(t.state in ACTIVE for t in user.tasks)

    def tokens_last_hour(self, uid: int) -> int:
        user = self._user(uid)
        now = self.clock()
        total = self.usage(uid)
        delta, user.seen_tokens = total - user.seen_tokens, total
        start, user.seen_at = user.seen_at, now
        if delta > 0:
            self._spread(user, delta, start, now)
        oldest = int((now - WINDOW_S) // BUCKET_S)  # a partly old minute still counts
        for minute in [m for m in user.buckets if m < oldest]:
            del user.buckets[minute]
        return round(sum(user.buckets.values()))

    @staticmethod
    def _spread(user: _User, tokens: int, start: float, end: float) -> None:
        """Add ``tokens`` processed evenly between ``start`` and ``end`` to the buckets."""
        if end - start < 1.0:
            minute = int(end // BUCKET_S)
            user.buckets[minute] = user.buckets.get(minute, 0.0) + tokens
            return
        rate = tokens / (end - start)
        t = max(start, end - WINDOW_S)
        while t < end:
            minute = int(t // BUCKET_S)
            upto = min(end, (minute + 1) * BUCKET_S)
            user.buckets[minute] = user.buckets.get(minute, 0.0) + rate * (upto - t)
            t = upto

    # -- checks ----------------------------------------------------------------------

    def refused(self, uid: int, task: str, reason: str) -> None:
        """Remember a refused request of ``uid`` (any, not only over a limit) for its file."""
        user = self._user(uid)
        user.num_refused += 1
        user.refusals.append((self.clock(), f"task={task} {reason}"))

    def check_prompt_bytes(self, uid: int, size: int) -> None:
        limit = self.limits_for(uid).prompt_bytes
        if size > limit:
            raise TooLarge(f"prompt is over {limit} bytes (limit prompt_bytes of uid {uid})")

    def check_config(self, uid: int, config: TaskConfig) -> None:
        limit = self.limits_for(uid).max_tokens
        if config.max_tokens > limit:
            raise ParameterTooLarge(f"max_tokens {config.max_tokens} is over {limit} "
                                    f"(limit max_tokens of uid {uid})")

    def check_submit(self, uid: int, config: TaskConfig | None) -> None:
        """Whether ``uid`` may queue one more task with ``config`` (None: the defaults,
        which ``track`` keeps within the limits); raises why not."""
        if config is not None:
            self.check_config(uid, config)
        limits = self.limits_for(uid)
        error: QuotaExceeded | None = None
        if (n := self.active(uid)) >= limits.tasks:
            error = QuotaExceeded(f"uid {uid} has {n} tasks queued or running "
                                  f"(limit tasks {limits.tasks})")
        elif limits.tokens_per_hour and (used := self.tokens_last_hour(uid)) >= limits.tokens_per_hour:
            error = QuotaExceeded(f"uid {uid} used {used} tokens in the last hour "
                                  f"(limit tokens_per_hour {limits.tokens_per_hour})")
        if error is not None:
            raise error

    # -- the users/UID file ----------------------------------------------------------

    def render(self, uid: int) -> str:
        limits = self.limits_for(uid)
        user = self._user(uid)
        rows: list[tuple[str, object]] = [
            ("uid", uid),
            ("tasks", self.active(uid)),
            ("tasks_limit", limits.tasks),
            ("prompt_bytes_limit", limits.prompt_bytes),
            ("max_tokens_limit", limits.max_tokens),
            ("tokens_last_hour", self.tokens_last_hour(uid)),
            ("tokens_per_hour_limit", limits.tokens_per_hour),
            ("refusals", user.num_refused),
        ]
        rows += [("refused", f"{_stamp(t)} {reason}") for t, reason in user.refusals]
        return "".join(f"{k} {v}\n" for k, v in rows)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
