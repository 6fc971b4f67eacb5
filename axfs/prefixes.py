"""Comparing token lists: the longest common beginning of a prompt and a sequence's
tokens, which the KV manager asks for each waiting task against each sequence
(axfs/kv.py, ``_best_prefix``).

The lists are compared packed (``array``'s bytes, 4 a token): a slice of bytes compares
with one ``memcmp``, where a slice of a list compares token by token, and a binary
search compares about 12 slices of a 4,000-token prompt.
"""

from __future__ import annotations

from array import array

PACKED_KEPT = 4096  # token lists a KV manager keeps packed (then it drops them all)


def pack(tokens: list[int]) -> bytes:
    return array("i", tokens).tobytes()


def common_packed(a: bytes, b: bytes, limit: int) -> int:
    """Tokens the packed lists ``a`` and ``b`` begin with alike, at most ``limit``."""
    hi = min(len(a) // 4, len(b) // 4, limit)
    if hi <= 0 or a[: 4 * hi] == b[: 4 * hi]:
        return max(hi, 0)
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[: 4 * mid] == b[: 4 * mid]:
            lo = mid
        else:
            hi = mid
    return lo


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common beginning of ``a`` and ``b``, at most ``limit``."""
    return common_packed(pack(a), pack(b), limit)
