"""The text of the tree's read-only files, rendered from kernel state.

These are the interface's formats: docs/tree.md documents each of them; change them
only together with docs/tree.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from axfs.kernel import Kernel
from axfs.remote import RemoteRuntime
from axfs.runtime import LocalRuntime
from axfs.swap import SwapSpace
from axfs.task import Task

MIB = 1 << 20


def _ms(start: float, end: float) -> str:
    return f"{(end - start) * 1000:.1f}" if start and end else "-"


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "-"


def status(task: Task, cell_bytes: int) -> str:
    now = time.time()
    end = task.finished_at or now
    decode_s = end - task.first_token_at if task.first_token_at else 0.0
    rate = f"{(task.num_generated - 1) / decode_s:.2f}" if decode_s > 0 and task.num_generated > 1 else "-"
    rows = [
        ("state", task.state.value),
        ("finish_reason", task.finish_reason or "-"),
        ("model", task.config.model),
        ("uid", task.uid),
        ("priority", task.config.priority),
        ("prompt_tokens", len(task.prompt_tokens)),
        ("prefilled_tokens", task.num_prompt_cached),
        ("generated_tokens", task.num_generated),
        ("tokens_run", task.num_processed),
        ("preemptions", task.num_preempted),
        ("waited_ms", f"{task.waited_total_s * 1000:.1f}"),
        ("stream_bytes", len(task.output)),
        ("kv_cells", task.kv_cells),
        ("kv_bytes", task.kv_cells * cell_bytes),
        ("kv_reserved_cells", task.kv_reserved),
        ("kv_prefix_reused", task.prefix_reused),
        ("parent", task.parent or "-"),
        ("kv_swapped", SwapSpace.where(task.saved) or "no"),
        ("submitted", _stamp(task.submitted_at)),
        ("queued_ms", _ms(task.submitted_at, task.started_at or (0 if task.finished else now))),
        ("first_token_ms", _ms(task.submitted_at, task.first_token_at)),
        ("elapsed_ms", _ms(task.submitted_at, end)),
        ("decode_tokens_per_second", rate),
    ]
    return "".join(f"{k} {v}\n" for k, v in rows)


def memory(kernel: Kernel) -> str:
    """The KV cache of each loaded local model, in /proc/meminfo style, one section a
    model (a blank line between), the default model first."""
    runtimes = _local_runtimes(kernel)
    if not runtimes:
        return "Model: none loaded\n"
    return "\n".join(_memory(r) for r in runtimes)


def _local_runtimes(kernel: Kernel) -> list[LocalRuntime]:
    found = [r for r in kernel.runtimes.values() if isinstance(r, LocalRuntime)]
    return sorted(found, key=lambda r: (r.name != kernel.registry.default, r.name))


def _memory(runtime: LocalRuntime) -> str:
    """Used = Running + Cached; Free is what a new task can have at once (less the room
    running tasks have reserved for their output); cached sequences are evicted when
    that is not enough."""
    kv = runtime.kv.stats()
    c = runtime.kv.counters
    swap = runtime.engine.swap
    rows: list[tuple[str, str]] = []
    for key, n in [("KVCapacity", kv.capacity_cells), ("KVUsed", kv.used_cells),
                   ("KVRunning", kv.running_cells), ("KVCached", kv.cached_cells),
                   ("KVReservedGrowth", kv.growth_cells), ("KVFree", kv.free_cells)]:
        rows += [(key, f"{n} cells"), (key + "Bytes", f"{n * kv.cell_bytes // 1024} kB")]
    rows += [
        ("KVCellBytes", f"{kv.cell_bytes} B"),
        ("PerTaskContext", f"{runtime.kv.seq_limit} cells"),
        ("Sequences", f"{kv.slots_running + kv.slots_cached} of {kv.slots}"),
        ("SequencesRunning", f"{kv.slots_running}"),
        ("SequencesCached", f"{kv.slots_cached}"),
        ("PrefixCache", "on" if runtime.kv.prefix_cache else "off"),
        ("PrefixCacheLimit", f"{runtime.kv.cache_limit} cells"),
        ("PrefixHits", f"{c.prefix_hits}"),
        ("PrefixTokensSaved", f"{c.prefix_tokens} tokens"),
        ("Evictions", f"{c.evictions}"),
        ("EvictedTokens", f"{c.evicted_cells} tokens"),
        ("SwapMemLimit", f"{swap.mem_limit // 1024} kB"),
        ("SwappedMem", f"{swap.mem_bytes // 1024} kB"),
        ("SwappedMemTasks", f"{swap.mem_count}"),
        ("SwappedDisk", f"{swap.disk_bytes // 1024} kB"),
        ("SwappedDiskTasks", f"{swap.disk_count}"),
        ("SwapOuts", f"{swap.outs}"),
        ("SwapOutBytes", f"{swap.out_bytes // 1024} kB"),
        ("SwapIns", f"{swap.ins}"),
        ("SwapInBytes", f"{swap.in_bytes // 1024} kB"),
        ("SwapErrors", f"{swap.errors}"),
        ("TasksRunning", f"{kv.slots_running}"),
        ("TasksWaiting", f"{len(runtime.scheduler.waiting)}"),
        ("TasksWaitingForMemory", f"{runtime.scheduler.waiting_for_memory}"),
        ("Model", runtime.name),
    ]
    width = max(len(k) for k, _ in rows) + 1
    return "".join(f"{k + ':':<{width}} {v:>16}\n" for k, v in rows)


def sched(kernel: Kernel) -> str:
    """The scheduler's policy and state, ``key value`` lines; users as user.UID.KEY. One
    section a loaded model (a blank line between), each beginning ``model NAME``."""
    sections = [_sched(kernel, r) for r in _local_runtimes(kernel)]
    sections += [_remote_sched(kernel, r) for r in kernel.runtimes.values()
                 if isinstance(r, RemoteRuntime)]
    # Whether submissions can be journaled (axfs.persist): the same in every section.
    journal = f"journal {kernel.keeper.state if kernel.keeper else 'off'}\n"
    return "\n".join(s + journal for s in sections) if sections else "model none loaded\n" + journal


def _runnable(kernel: Kernel, model: str) -> list[Task]:
    return [t for t in kernel.tasks.values() if t.config.model == model
            and t.state.value in ("queued", "running", "preempted")]


def _remote_sched(kernel: Kernel, runtime: RemoteRuntime) -> str:
    """A remote model's section: its queue, each endpoint's slots and use (``endpoint URL
    slots=N running=N ...``), each user's share and use (as a local model's)."""
    queue = runtime.queue
    tasks = _runnable(kernel, runtime.name)
    rows: list[tuple[str, object]] = [
        ("model", runtime.name), ("remote", "yes"), ("policy", queue.policy.name),
        ("runnable", len(tasks)), ("running", runtime.num_running),
        ("waiting", runtime.num_waiting), ("slots", runtime.pool.capacity()),
        ("preemptions", queue.num_preemptions), ("tokens", runtime.num_tokens),
        ("deadlines_met", runtime.deadlines.met), ("deadlines_missed", runtime.deadlines.missed)]
    rows += [(f"endpoint {e.url}", f"slots={e.slots} slots_from={e.slots_from} running={e.inflight} "
              f"served={e.served} state={e.state}") for e in runtime.pool.status()]
    sending = set(queue.running)
    rows += _user_rows(queue.policy.users(), tasks, lambda t: t in sending)
    return "".join(f"{k} {v}\n" for k, v in rows)


def _user_rows(users: dict[int, tuple[float, float]], tasks: list[Task],
               running: Callable[[Task], bool], cells: Callable[[Task], int] | None = None
               ) -> list[tuple[str, object]]:
    """``user.UID.KEY`` rows: weight, share (of the users with runnable ``tasks``), use
    (of the tokens run), tokens, tasks running and waiting, and (``cells``) KV cells."""
    active = {t.uid for t in tasks}
    total_weight = sum(w for uid, (w, _) in users.items() if uid in active) or 1.0
    total_tokens = sum(n for _, n in users.values()) or 1.0
    rows: list[tuple[str, object]] = []
    for uid, (weight, tokens) in sorted(users.items()):
        mine = [t for t in tasks if t.uid == uid]
        rows += [
            (f"user.{uid}.weight", f"{weight:g}"),
            (f"user.{uid}.share", f"{weight / total_weight:.3f}" if uid in active else "0"),
            (f"user.{uid}.use", f"{tokens / total_tokens:.3f}"),
            (f"user.{uid}.tokens", f"{tokens:g}"),
            (f"user.{uid}.running", sum(1 for t in mine if running(t))),
            (f"user.{uid}.waiting", sum(1 for t in mine if not running(t))),
        ]
        if cells is not None:
            rows.append((f"user.{uid}.kv_cells", sum(cells(t) for t in mine)))
    return rows


def _sched(kernel: Kernel, runtime: LocalRuntime) -> str:
    s = runtime.scheduler
    tasks = _runnable(kernel, runtime.name)
    rows: list[tuple[str, object]] = [
        ("model", runtime.name),
        ("policy", s.policy.name),
        ("runnable", len(tasks)),
        ("running", len(s.running)),
        ("waiting", len(s.waiting)),
        ("slots", runtime.kv.slots),
        ("batch_size", s.last_batch),
        ("n_batch", s.n_batch),
        ("prefill_chunk", s.prefill_chunk),
        ("min_turn_tokens", s.min_turn),
        ("quantum_tokens", s.quantum),
        ("preemptions", s.num_preemptions),
        ("steps", runtime.engine.num_steps),
        ("tokens", runtime.engine.num_tokens),
        ("deadlines_met", runtime.deadlines.met),
        ("deadlines_missed", runtime.deadlines.missed),
    ]
    rows += _user_rows(s.policy.users(), tasks, lambda t: t.seq is not None,
                       cells=lambda t: t.kv_reserved if t.seq is not None else 0)
    return "".join(f"{k} {v}\n" for k, v in rows)


def model_info(kernel: Kernel, name: str) -> str:
    """models/NAME/info: what the GGUF says, and where and how the model runs."""
    entry = kernel.registry.entries[name]
    runtime = kernel.runtimes.get(name)
    rows: list[tuple[str, object]] = [("name", name)]
    if entry.remote or not entry.path:
        rows += [("kind", "remote"), ("endpoints", " ".join(entry.endpoints) or "-"),
                 ("key_file", entry.key_file or "-"), ("ca_file", entry.ca_file or "-")]
        if isinstance(runtime, RemoteRuntime):
            for e in runtime.pool.status():
                rows.append((f"endpoint {e.url}",
                             f"{e.state} slots={e.slots} inflight={e.inflight} served={e.served} "
                             f"failures={e.failures}"
                             + (f" retry_in_s={e.retry_in_s:.0f} error={e.last_error}"
                                if not e.up else "")))
    else:
        rows += [("kind", "local"), ("path", entry.path), ("copied", "yes" if entry.copied else "no")]
        g = kernel.file_info(name)  # as last read: a request never waits on a user's file
        if isinstance(g, str):
            rows.append(("file_error", g))
        else:
            rows += [
                ("architecture", g.architecture), ("description", g.name),
                ("parameters", g.parameters), ("quantisation", g.quantisation),
                ("context_length", g.context_length), ("layers", g.layers),
                ("vocab_size", g.vocab_size), ("size_bytes", g.size_bytes),
                ("chat_template", "yes" if g.chat_template else "no"),
            ]
        rows.append(("gpu_layers_setting", "auto" if entry.gpu_layers is None else entry.gpu_layers))
    rows.append(("template", entry.template or "-"))
    if isinstance(runtime, LocalRuntime):
        info = runtime.info
        kv = runtime.kv.stats()
        rows += [("device", info.device), *info.extra.items(),
                 ("kv_bytes", kv.capacity_cells * kv.cell_bytes), ("sha256", runtime.sha or "-")]
    rows += [
        ("loaded", "yes" if runtime is not None else "no"),
        ("default", "yes" if kernel.registry.default == name else "no"),
        ("tasks_active", kernel.in_use(name)),
    ]
    if kernel.load_error(name):
        rows.append(("load_error", kernel.load_error(name)))
    return "".join(f"{k} {v}\n" for k, v in rows)


def ctl(task: Task) -> str:
    return f"priority {task.config.priority}\n"
