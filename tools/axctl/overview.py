"""``axctl status``: the box at a glance, from models/*/info, devices, memory and sched.

Fields it does not know are shown as they are, so what the tree adds shows up here
without a change to axctl.
"""

from __future__ import annotations

import pwd
from collections import Counter

from tools.axctl.tree import STATES, Tree, TreeError, first_number

SCHED_SHOWN = ("runnable", "running", "waiting", "slots", "batch_size", "preemptions", "steps", "tokens")


def user_name(uid: str) -> str:
    try:
        return pwd.getpwuid(int(uid)).pw_name
    except (KeyError, ValueError):
        return uid


def human(n: float, unit: str = "") -> str:
    """268098176 -> 268.1M; with a unit, 246587904, "B" -> 246.6 MB."""
    space = " " if unit else ""
    for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{space}{prefix}{unit}"
    return f"{n:g}{space}{unit}"


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def models(tree: Tree) -> list[str]:
    lines = []
    for name in tree.models():
        try:
            info = tree.fields(f"models/{name}/info")
        except TreeError as e:
            lines.append(f"  {name}  ({e})")
            continue
        marks = ", ".join(m for m, key in (("default", "default"), ("loaded", "loaded"))
                          if info.get(key) == "yes") or "not loaded"
        params = first_number(info.get("parameters"))
        lines += [f"  {name}  [{marks}]",
                  f"    {info.get('architecture', '?')}, {human(params)} parameters, "
                  f"{info.get('quantisation', '?')}, context {info.get('context_length', '?')}, "
                  f"{human(first_number(info.get('size_bytes')), 'B')}, on {info.get('device', '?')}"]
    return lines or ["  none"]


def device(dev: str, a: dict[str, str]) -> str:
    if dev.startswith("cpu"):
        return (f"{a.get('name', '?')}, {a.get('cores', '?')} cores, load {a.get('load_1min', '?')}, "
                f"memory {a.get('memory_available', '?')} available of {a.get('memory_total', '?')}")
    if dev.startswith("gpu"):
        text = (f"{a.get('name', '?')}, memory {a.get('memory_used', '?')} used of "
                f"{a.get('memory_total', '?')}, utilisation {a.get('utilisation', '?')}")
        return text + "".join(f", {k} {a[k]}" for k in ("temperature", "power") if k in a)
    return ", ".join(f"{k} {v}" for k, v in a.items())


def devices(tree: Tree) -> list[str]:
    """cpu0, gpu0, ... one line each (from their ``dev.key`` fields), then loose lines."""
    groups: dict[str, dict[str, str]] = {}
    loose = []
    for key, value in tree.fields("devices").items():
        dev, dot, attr = key.partition(".")
        if dot:
            groups.setdefault(dev, {})[attr] = value
        else:
            loose.append(f"  {key}: {value}")
    return [f"  {dev}: {device(dev, a)}" for dev, a in groups.items()] + loose


def wrap(items: list[str], width: int = 100, indent: str = "  ") -> list[str]:
    """``items`` joined with commas into lines of at most about ``width`` characters."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(item) + 2 <= width:
            lines[-1] += f", {item}"
        else:
            lines.append(indent + item)
    return lines


def memory(tree: Tree) -> list[str]:
    """A summary of the KV cache, then the other fields of ``memory`` that are not zero."""
    m = tree.fields("memory")
    cap, used = first_number(m.get("KVCapacity")), first_number(m.get("KVUsed"))
    summary = f"  KV cache {used:g} of {cap:g} cells used ({percent(used, cap)})"
    if "KVFree" in m:
        summary += f", {first_number(m['KVFree']):g} free"
    if "Sequences" in m:
        summary += f"; sequences {m['Sequences']}"
    summarised = ("KVCapacity", "KVUsed", "KVFree", "Sequences")
    rest = [f"{k} {v}" for k, v in m.items()
            if not k.startswith(summarised) and first_number(v, default=1.0) != 0]
    return [summary, *wrap(rest), f"  (counters at zero left out: cat {tree.path('memory')})"]


def queue(tree: Tree) -> list[str]:
    s = tree.fields("sched")
    lines = [f"  policy {s.get('policy', '?')}: " + ", ".join(f"{k} {s[k]}" for k in SCHED_SHOWN if k in s)]
    users = sorted({k.split(".")[1] for k in s if k.startswith("user.")}, key=lambda u: int(u))
    for uid in users:
        def u(key: str, uid: str = uid) -> str:
            return s.get(f"user.{uid}.{key}", "?")
        lines.append(f"  user {user_name(uid)} ({uid}): share {u('share')}, use {u('use')}, "
                     f"{u('running')} running, {u('waiting')} waiting, {u('tokens')} tokens")
    return lines


def tasks(tree: Tree) -> list[str]:
    states: Counter[str] = Counter()
    for task in tree.task_ids():
        try:
            states[tree.status(task).get("state", "?")] += 1
        except TreeError:
            continue  # removed while we looked
    order = [*STATES, *sorted(set(states) - set(STATES))]
    return ["  " + ", ".join(f"{states[s]} {s}" for s in order)]


def render(tree: Tree) -> str:
    sections = [("Models", models), ("Devices", devices), ("Memory", memory), ("Queue", queue),
                ("Tasks", tasks)]
    out = [f"axfs at {tree.root}"]
    for title, section in sections:
        out += ["", title, *section(tree)]
    return "\n".join(out) + "\n"
