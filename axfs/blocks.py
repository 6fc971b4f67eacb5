"""The cells of llama.cpp's unified KV cache, as the KV manager (axfs.kv) counts them.

A cell belongs to every sequence that holds it and is free when none does; copying a
prefix from one sequence to another (``llama_memory_seq_cp``) adds the copy to the same
cells without new ones. The table keeps that picture as *blocks*, runs of cells with a
count of the slots that reference them, so it knows at every moment how many cells are
in use and which would come free if a sequence went. It is storage only: which slot is
running, cached or free, and who may have cells, is the KV manager's business.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class Block:
    """A run of ``size`` cells held by ``refs`` sequences."""

    __slots__ = ("refs", "size")

    def __init__(self, size: int, refs: int = 1) -> None:
        self.size = size
        self.refs = refs


class BlockTable:
    def __init__(self, slots: int) -> None:
        self.used = 0  # cells held by any slot (a shared cell counts once)
        self._slots: dict[int, list[Block]] = {s: [] for s in range(slots)}

    def cells(self, slot: int) -> int:
        """Cells ``slot`` holds (shared ones included)."""
        return sum(b.size for b in self._slots[slot])

    def own(self, slot: int) -> int:
        """Cells only ``slot`` holds: what dropping it alone would free."""
        return sum(b.size for b in self._slots[slot] if b.refs == 1)

    def held(self, slots: Iterable[int]) -> int:
        """Cells held by at least one of ``slots`` (a shared cell counts once)."""
        blocks = {id(b): b for s in slots for b in self._slots[s]}
        return sum(b.size for b in blocks.values())

    def freeing(self, slots: Iterable[int]) -> Iterator[tuple[int, int]]:
        """For each of ``slots`` in order: the slot, and the cells freed were it and the
        slots before it dropped (a cell also held by a slot that stays is not freed)."""
        left: dict[int, int] = {}  # id(block) -> references left after the drops so far
        freed = 0
        for slot in slots:
            for b in self._slots[slot]:
                refs = left.get(id(b), b.refs) - 1
                left[id(b)] = refs
                if refs == 0:
                    freed += b.size
            yield slot, freed

    def grow(self, slot: int, n: int) -> None:
        """``n`` new cells were computed for the sequence in ``slot``."""
        blocks = self._slots[slot]
        if blocks and blocks[-1].refs == 1:
            blocks[-1].size += n
        else:
            blocks.append(Block(n))
        self.used += n

    def share(self, source: int, slot: int, n: int) -> None:
        """``slot`` (empty) now holds the first ``n`` cells of ``source`` too."""
        cut = self._split(source, n)
        shared = self._slots[source][:cut]
        for b in shared:
            b.refs += 1
        self._slots[slot] = list(shared)

    def truncate(self, slot: int, n: int) -> None:
        """``slot`` keeps only its first ``n`` cells."""
        cut = self._split(slot, n)
        for b in self._slots[slot][cut:]:
            self._unref(b)
        del self._slots[slot][cut:]

    def drop(self, slot: int) -> None:
        """Free ``slot``'s cells (shared ones stay with their other holders)."""
        for b in self._slots[slot]:
            self._unref(b)
        self._slots[slot] = []

    def _split(self, slot: int, n: int) -> int:
        """Make a block boundary at cell ``n`` of ``slot``; return the index of the first
        block past it."""
        pos = 0
        for i, b in enumerate(self._slots[slot]):
            if pos == n:
                return i
            if pos + b.size > n:
                tail = Block(pos + b.size - n, b.refs)
                b.size = n - pos
                for blocks in self._slots.values():
                    for j, other in enumerate(blocks):
                        if other is b:
                            blocks.insert(j + 1, tail)
                            break
                return i + 1
            pos += b.size
        return len(self._slots[slot])

    def _unref(self, b: Block) -> None:
        b.refs -= 1
        if b.refs == 0:
            self.used -= b.size
