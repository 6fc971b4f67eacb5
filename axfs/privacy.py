"""What one user may see of another's work on a tree mounted with ``--multi-user``.

The rule (docs/tree.md, "Many users", has it as a table): a user sees their own tasks and
trace lines in full; of other users' work, only what the scheduler shares between them
(event names, uids, task ids and counts), never text a user wrote: prompts, fork text,
config values, refused lines, task names. Root, and every reader of a tree mounted
without ``--multi-user``, sees everything.

Each kind of file asks here, and only here: ``viewer`` says whose view a request gets,
``sees_task`` which tasks a directory lists, ``public_line`` what others see of a trace
line (applied once, when the line is made, so that reading stays cheap: axfs.trace).
"""

from __future__ import annotations

Viewer = int | None  # the uid whose view a reader gets; None: everything (root)

# Trace details whose values are counts or a word from a fixed set, whoever's line it is.
PUBLIC_KEYS = frozenset({
    "prompt_tokens", "context_tokens", "tokens", "seq", "kv_cells", "cells", "prefix",
    "done", "of", "ms", "seconds", "bytes", "resumed", "remote", "keep_kv", "waiting",
    "state", "run", "result",
})
# Keys public only in some events: there they are words from a fixed set; elsewhere the
# same key carries text (a refusal's ``reason`` quotes the line that was refused).
PUBLIC_IN_EVENT = {"done": frozenset({"reason"}), "remove": frozenset({"reason"}),
                   "swap_out": frozenset({"to"})}
_ALLOWED = {event: PUBLIC_KEYS | keys for event, keys in PUBLIC_IN_EVENT.items()}
NAMED = "*"  # what others see in place of a task name chosen with mkdir


def viewer(multi_user: bool, uid: int) -> Viewer:
    """Whose view user ``uid`` gets: their own on a multi-user tree, else everything."""
    return uid if multi_user and uid != 0 else None


def sees_task(who: Viewer, owner: int) -> bool:
    """Whether ``who`` finds a task of ``owner`` in a listing (tasks/, replay/).

    Another user's task is not listed: its name may be text (``mkdir tasks/NAME``). Its
    directory is still there, mode 0700, for whoever knows the name (EACCES)."""
    return who is None or who == owner


def shown_id(task: str) -> str:
    """A task id as others see it: ids the kernel gives (digits) as they are, names as *.

    A name of digits only is indistinguishable from an id and is shown like one."""
    return task if task.isdigit() or task == "-" else NAMED


def public_line(event: str, task: str, uid: int | str, details: dict[str, object]
                ) -> tuple[str, dict[str, object]] | None:
    """What other users see of a trace line: its task column and details, or None when
    that is the whole line as it is (most lines: counts about numbered tasks).

    A line without a uid is the system's (model loads, the journal) and keeps its
    details; one that names a task anyway keeps them from all but root, since whose
    task it is cannot be told."""
    if uid == "-" and task == "-":
        return None
    task_shown = shown_id(task)
    allowed = _ALLOWED.get(event, PUBLIC_KEYS)
    if task_shown == task and allowed.issuperset(details):
        return None
    return task_shown, {k: v for k, v in details.items() if k in allowed}
