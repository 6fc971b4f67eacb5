"""Reading the tree's ``key value`` files (status, memory, sched, models/NAME/info) back
into a dict: the one parser for axctl (tools/axctl/tree.py) and the live page
(axfs/http/top.py). Imports nothing, so that axctl starts fast."""

from __future__ import annotations


def parse_fields(text: str) -> dict[str, str]:
    """``key value`` and ``Key: value`` lines as a dict (the key without its colon)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            fields[key.removesuffix(":")] = value.strip()
    return fields
