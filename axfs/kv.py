"""The KV-cache manager: sequence slots, cells, shared prefixes and cached sequences.

Its picture of the cache is llama.cpp's unified cache, kept as blocks of shared cells
(axfs.blocks), so it knows at every moment how many cells are in use and which would
come free if a sequence went.

A slot is free, running (an admitted task's sequence) or cached (the sequence of a task
that ended, kept so that a later prompt with the same beginning copies it instead of
computing it again; evicted least recently used first when its slot or cells are
needed, and at once when it is short and no longer the newest: ``MIN_KEPT``).

Admission is check, then commit: ``plan`` works out which sequence to copy a prefix
from, which slot to use and which cached sequences to evict, without changing
anything; ``commit`` applies that plan. A task reserves its memory as it grows: its
history (prompt and text so far) and ``RESERVE_AHEAD`` cells more at admission, then
``RESERVE_AHEAD`` more each time it has used what it holds (``reserve``), never past its
prompt plus ``max_tokens`` or the per-task context. So a running task never finds the
cache full in the middle of a step, and a task that asks for a million tokens holds only
what it has used. When there is no room to grow, the scheduler decides who gives way.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

from axfs.blocks import BlockTable
from axfs.prefixes import PACKED_KEPT, common_packed, common_prefix, pack
from axfs.task import Task
from drivers.base import SeqState

MIN_PREFIX = 8  # shortest shared prefix worth copying (every prompt shares its BOS)
# An ended sequence shorter than this stays cached only while it is the newest cached one
# (a conversation or a fork goes on from it). Every cell the cache holds slows every
# step: llama.cpp builds each step's attention mask over, and flash attention walks,
# every cell up to the last used one. 4,096 cached cells of idle sequences took 32 tiny-
# model streams to 0.55x of their rate and 16 Gemma 3 270M streams to 0.86x (docs/
# benchmarks.md, "The floor, and what cached cells cost"), while a prompt this short is
# computed again within one batched step.
MIN_KEPT = 256
WAIT_GAIN = 32  # a task waits for a prefix another task is computing if it saves this many
RESERVE_AHEAD = 256  # cells a task reserves beyond what it has used


@dataclass(slots=True)
class Cached:
    """A finished task's sequence, kept for the prompts that begin like it."""

    slot: int
    tokens: list[int]  # the tokens whose KV the slot holds
    task_id: str


@dataclass(slots=True)
class Admission:
    """How a task gets in: its slot, the prefix it copies and what is evicted for it."""

    task: Task
    slot: int
    cells: int  # cells reserved: prompt and room for max_tokens
    source: int | None = None  # slot whose first ``prefix`` cells the task shares
    prefix: int = 0
    adopt: bool = False  # the source is a cached sequence taken over and trimmed
    evict: list[int] = field(default_factory=list)  # cached slots cleared first


@dataclass(slots=True)
class KVStats:
    capacity_cells: int
    used_cells: int  # cells held by any sequence (a shared cell counts once)
    running_cells: int  # held by at least one running sequence
    cached_cells: int  # held only by cached sequences
    growth_cells: int  # reserved by running tasks for tokens not yet computed
    cell_bytes: int
    slots: int
    slots_running: int
    slots_cached: int

    @property
    def free_cells(self) -> int:
        """Cells a new task can have without evicting anything."""
        return self.capacity_cells - self.used_cells - self.growth_cells


@dataclass(slots=True)
class KVCounters:
    prefix_hits: int = 0
    prefix_tokens: int = 0  # prompt tokens copied instead of computed
    evictions: int = 0
    evicted_cells: int = 0


class KVManager:
    def __init__(self, capacity_cells: int, slots: int, cell_bytes: int, seq_limit: int,
                 prefix_cache: bool = True, cache_limit: int | None = None) -> None:
        self.capacity_cells = capacity_cells
        self.seq_limit = min(seq_limit, capacity_cells)  # most cells one sequence may hold
        self.slots = slots
        self.cell_bytes = cell_bytes
        self.prefix_cache = prefix_cache
        # Cells held only by cached sequences, at most: llama.cpp's attention spans every
        # used cell of the unified cache, so cached cells slow every step (MIN_KEPT).
        self.cache_limit = capacity_cells // 4 if cache_limit is None else cache_limit
        self.counters = KVCounters()
        self.blocks = BlockTable(slots)
        self._free = list(range(slots - 1, -1, -1))
        self._running: dict[int, Task] = {}
        self._cached: OrderedDict[int, Cached] = OrderedDict()  # least recently used first
        # waiting task -> (its history's length, the history packed,
        #                  {id(tokens): (tokens, common prefix)}); id(tokens) -> (tokens, packed)
        self._memo: WeakKeyDictionary[Task, tuple[int, bytes, dict[int, tuple[list[int], int]]]] = (
            WeakKeyDictionary())
        self._packed: dict[int, tuple[list[int], bytes]] = {}

    # -- questions -------------------------------------------------------------------

    def limit(self, task: Task) -> int:
        """Most cells ``task`` can ever hold: its prompt and every token it may generate,
        within the per-task context."""
        return min(len(task.prompt_tokens) + task.config.max_tokens, self.seq_limit)

    def need(self, task: Task) -> int:
        """Cells ``task`` reserves to be admitted: its history and ``RESERVE_AHEAD`` more."""
        return min(task.num_history + RESERVE_AHEAD, self.limit(task))

    def cells(self, slot: int) -> int:
        """Cells slot ``slot`` holds (shared ones included)."""
        return self.blocks.cells(slot)

    @property
    def used_cells(self) -> int:
        """Cells held by any sequence (a shared cell counts once)."""
        return self.blocks.used

    @property
    def growth_cells(self) -> int:
        return sum(max(0, t.kv_reserved - t.num_cached) for t in self._running.values())

    def cached_slots(self) -> list[int]:
        return list(self._cached)

    def cached(self, slot: int) -> Cached | None:
        return self._cached.get(slot)

    def _best_prefix(self, task: Task) -> tuple[int | None, int, int]:
        """The slot with the longest usable prefix of ``task``'s history, its length, and
        the longest prefix a running task is still computing (worth waiting for)."""
        history = task.prompt_tokens + task.output_tokens
        limit = len(history) - 1  # the last token is fed again to get its logits
        best: tuple[int | None, int] = (None, 0)
        pending = 0
        for slot, other in self._running.items():
            if other is task:
                continue
            prompt = other.prompt_tokens
            n = self._common(task, history, prompt, limit)
            if n >= len(prompt) and other.output_tokens:
                n += common_prefix(history[n:], other.output_tokens, limit - n)
            usable = min(n, other.num_cached)
            if usable > best[1]:
                best = (slot, usable)
            if other.num_cached < min(n, len(other.prompt_tokens)):
                pending = max(pending, min(n, len(other.prompt_tokens)))
        for slot, entry in self._cached.items():
            n = self._common(task, history, entry.tokens, limit)
            if n > best[1]:
                best = (slot, n)
        return best[0], best[1], pending

    def _common(self, task: Task, history: list[int], tokens: list[int], limit: int) -> int:
        """``common_prefix(history, tokens, limit)`` for ``task`` waiting, remembered until
        its history changes, and compared packed (``array``'s bytes, a ``memcmp`` each
        comparison): every waiting task is planned every step against every sequence, and
        a burst of 100 prompts of 4,150 tokens spent most of its time comparing lists
        (docs/benchmarks.md, the KV manager). ``tokens`` (a prompt, a cached sequence's)
        never changes; the memos keep it alive, so its id names it."""
        seen = self._memo.get(task)
        if seen is None or seen[0] != len(history):
            seen = self._memo[task] = (len(history), pack(history), {})
        hit = seen[2].get(id(tokens))
        if hit is not None:
            return hit[1]
        packed = self._packed.get(id(tokens))
        if packed is None:
            if len(self._packed) >= PACKED_KEPT:
                self._packed.clear()
            packed = self._packed[id(tokens)] = (tokens, pack(tokens))
        n = common_packed(seen[1], packed[1], limit)
        seen[2][id(tokens)] = (tokens, n)
        return n

    def prefix_pending(self, task: Task) -> bool:
        """Whether ``task`` should wait for a prefix a running task is still computing
        (then ``plan`` says None for it, however much room there is)."""
        if not self._may_share(task):
            return False
        _, prefix, pending = self._best_prefix(task)
        return pending - (prefix if prefix >= MIN_PREFIX else 0) >= WAIT_GAIN

    def _may_share(self, task: Task) -> bool:
        """Whether ``task`` may start from another sequence's prefix: it holds no KV yet,
        is not about to get its own back from a saved state, and is not a replay."""
        restoring = isinstance(task.saved, SeqState) and task.saved.kv is not None
        return self.prefix_cache and task.num_cached == 0 and not restoring and not task.exclusive

    # -- admission: plan, then commit --------------------------------------------------

    def plan(self, task: Task, pinned: set[int] | frozenset[int] = frozenset()
             ) -> Admission | None:
        """How ``task`` would be admitted now, or None when it cannot be (or should wait
        for a prefix another task is computing). Changes nothing. ``pinned`` slots (the
        sources of this step's earlier copies) are never evicted."""
        if not self._free and not self._cached:
            return None  # every slot runs a task (asked first: a burst's waiting tasks
            # are planned every step, and comparing prompts is what costs)
        need = self.need(task)
        source, prefix = None, 0
        if self._may_share(task):
            source, prefix, pending = self._best_prefix(task)
            if prefix < MIN_PREFIX:
                source, prefix = None, 0
            if pending - prefix >= WAIT_GAIN:
                return None
        adm = Admission(task=task, slot=-1, cells=need, source=source, prefix=prefix)
        victims = [s for s in self._cached if s not in pinned and s != source]
        first: list[int] = []  # a cached slot evicted for its slot, whatever it frees
        if self._free:
            adm.slot = self._free[-1]
        elif victims:
            adm.slot = victims[0]
            first = victims[:1]
        elif source is not None and source in self._cached:
            adm.slot, adm.adopt = source, True
        else:
            return None
        free = self.capacity_cells - self.used_cells - self.growth_cells
        evict = self._evictions(first, victims, need - prefix - free)
        if evict is None:
            return None
        adm.evict = evict
        return adm

    def _evictions(self, first: list[int], candidates: list[int], short: int
                   ) -> list[int] | None:
        """Cached slots to evict: ``first``, then ``candidates`` in order until ``short``
        cells are freed (a cell shared with a sequence that stays is not freed); None
        when all of them would not free enough."""
        out: list[int] = []
        freed = 0
        for slot, total in self.blocks.freeing([*first, *(c for c in candidates if c not in first)]):
            if freed >= short and slot not in first:
                break
            out.append(slot)
            freed = total
        return out if freed >= short else None

    def commit(self, adm: Admission) -> None:
        """Apply a plan made by ``plan`` (in the same step, before anything else changed)."""
        task, slot = adm.task, adm.slot
        for victim in adm.evict:
            self._drop(victim)
            self.counters.evictions += 1
            if victim != slot:
                self._free.append(victim)
        if slot in self._free:
            self._free.remove(slot)
        if adm.adopt:
            del self._cached[slot]
            self.blocks.truncate(slot, adm.prefix)
        elif adm.source is not None:
            self.blocks.share(adm.source, slot, adm.prefix)
            if adm.source in self._cached:
                self._cached.move_to_end(adm.source)
        if adm.source is not None:
            self.counters.prefix_hits += 1
            self.counters.prefix_tokens += adm.prefix
        self._running[slot] = task
        self._memo.pop(task, None)
        task.start(slot, adm.cells)
        if adm.prefix:
            task.num_cached = adm.prefix
            task.prefix_reused += adm.prefix
        elif task.num_cached:  # a preempted task whose KV is restored from its saved state
            self.blocks.grow(slot, task.num_cached)

    # -- while running -----------------------------------------------------------------

    def reserve(self, task: Task, pinned: set[int] | frozenset[int] = frozenset()
                ) -> list[int] | None:
        """Reserve ``RESERVE_AHEAD`` more cells (at most up to its limit) for the running
        ``task``, evicting cached sequences (never ``pinned`` ones) for them. Returns the
        evicted slots, for the driver to clear, or None (and changes nothing) when even
        every cached sequence would not make room."""
        extra = min(RESERVE_AHEAD, self.limit(task) - task.kv_reserved)
        if extra <= 0:
            return []
        free = self.capacity_cells - self.used_cells - self.growth_cells
        victims = self._evictions([], [s for s in self._cached if s not in pinned], extra - free)
        if victims is None:
            return None
        for slot in victims:
            self._evict(slot)
        task.kv_reserved += extra
        return victims

    def release(self, task: Task, cache: bool) -> list[int]:
        """Take ``task``'s slot back. With ``cache`` its sequence stays as a cached one
        (and older cached ones past ``cache_limit`` go); the slots whose cells were freed
        are returned, for the driver to clear."""
        slot = task.seq
        if slot is None or self._running.get(slot) is not task:
            return []
        del self._running[slot]
        task.seq = None
        task.kv_reserved = 0
        n = self.cells(slot)
        if cache and self.prefix_cache and n >= MIN_PREFIX:
            tokens = (task.prompt_tokens + task.output_tokens)[:n]
            self._cached[slot] = Cached(slot=slot, tokens=tokens, task_id=task.id)
            return self._trim_cache()
        self._drop(slot)
        self._free.append(slot)
        return [slot]

    def _trim_cache(self) -> list[int]:
        """Evict the cached sequences shorter than ``MIN_KEPT`` but the newest, then the
        least recently used past ``cache_limit`` cells (the newest one stays, so that a
        conversation can go on)."""
        newest = next(reversed(self._cached))
        out = [s for s in self._cached if s != newest and self.cells(s) < MIN_KEPT]
        for slot in out:
            self._evict(slot)
        while len(self._cached) > 1 and self.stats().cached_cells > self.cache_limit:
            slot = next(iter(self._cached))
            self._evict(slot)
            out.append(slot)
        return out

    def _evict(self, slot: int) -> None:
        """Drop the cached sequence in ``slot`` and free the slot."""
        self._drop(slot)
        self._free.append(slot)
        self.counters.evictions += 1

    def freed_by(self, task: Task) -> int:
        """Cells that preempting the running ``task`` would give back (its reserved growth
        and the cells no other sequence shares)."""
        if task.seq is None:
            return 0
        return self.blocks.own(task.seq) + max(0, task.kv_reserved - task.num_cached)

    def stats(self) -> KVStats:
        running = self.blocks.held(self._running)
        return KVStats(
            capacity_cells=self.capacity_cells,
            used_cells=self.used_cells,
            running_cells=running,
            cached_cells=self.used_cells - running,
            growth_cells=self.growth_cells,
            cell_bytes=self.cell_bytes,
            slots=self.slots,
            slots_running=len(self._running),
            slots_cached=len(self._cached),
        )

    def _drop(self, slot: int) -> None:
        """Free ``slot``'s cells (shared ones stay with their other holders)."""
        entry = self._cached.pop(slot, None)
        if entry is not None:
            self.counters.evicted_cells += len(entry.tokens)
        self.blocks.drop(slot)
