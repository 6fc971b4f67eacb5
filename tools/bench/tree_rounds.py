"""axfs's side of the throughput benches, and what their reports share: a fresh tree
mounted on a temporary mount point (``mounted``), and a round of N tasks through it,
each read by a real ``cat`` (``axfs_round``). tools/bench/throughput and
tools/bench/floor import it from their own folder, as baselines.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from baselines import PROMPTS, Request, Round, cpu_meter, others_meter

from mount.cli import pid_file

STAGES = ("write_to_submit", "submit_to_admit", "admit_to_first_token", "first_token_to_cat")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q in 0..100)."""
    s, k = sorted(values), (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def tok_s(rounds: list[Round]) -> float:
    return sum(r.tokens for rd in rounds for r in rd.requests) / sum(rd.wall_s for rd in rounds)


def ttfts(rounds: list[Round]) -> list[float]:
    return [r.ttft_ms for rd in rounds for r in rd.requests]


def print_table(cols: list[str], rows: list[list[str]]) -> None:
    """``rows`` under their column names, right-aligned, a rule under the names."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for i, row in enumerate([cols, *rows]):
        print(" | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.partition(":")[2].strip() for ln in lines if ln.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores"



MOUNT_OPTIONS: list[str] = []  # more `axfs mount` options (--axfs-option)
MOUNT_ENV: dict[str, str] = {}  # more environment for the axfs daemon (--axfs-env)
TASK_CONFIG: list[str] = []  # more config lines for axfs's tasks (--task-config)


def axfs_command() -> str:
    beside = Path(sys.executable).parent / "axfs"
    return str(beside) if beside.exists() else shutil.which("axfs") or "axfs"


@contextlib.contextmanager
def mounted(model: Path, repack: bool, ctx: int, slots: int, *extra: str
            ) -> Iterator[tuple[Path, int]]:
    """A fresh tree on a temporary mount point, and its daemon's pid; ``extra``: mount
    options after MOUNT_OPTIONS."""
    tmp = Path(tempfile.mkdtemp(prefix="axfs-bench-"))
    mp = tmp / "mnt"  # axfs mount makes it
    subprocess.run([axfs_command(), "mount", str(mp), "--model", str(model),
                    "--state-dir", str(tmp / "state"), "--repack", "on" if repack else "off",
                    "--ctx", str(ctx), "--slots", str(slots), *MOUNT_OPTIONS, *extra],
                   env={**os.environ, **MOUNT_ENV},
                   check=True, stdout=subprocess.DEVNULL)
    try:
        yield mp, int(pid_file(mp).read_text())
    finally:
        if subprocess.run([axfs_command(), "umount", str(mp)], check=False).returncode == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def key_values(path: Path) -> dict[str, str]:
    return dict(line.partition(" ")[::2] for line in path.read_text().splitlines())


def trace_times(mp: Path) -> dict[tuple[str, str], float]:
    """(task, event) -> the first time the trace recorded it (to the ms, so +-0.5 ms)."""
    times: dict[tuple[str, str], float] = {}
    for line in (mp / "trace").read_text().splitlines():
        stamp, task, _uid, event = line.split(" ", 4)[:4]
        t = datetime.strptime(stamp + "+0000", "%Y-%m-%dT%H:%M:%S.%fZ%z").timestamp() + 0.0005
        times.setdefault((task, event), t)
    return times


def axfs_round(mp: Path, daemon: int, tag: str, prompts: list[int], max_tokens: int,
               extra: str | None = None) -> Round:
    """N tasks at once, their config the plain one and ``extra`` (None: --task-config)."""
    tasks = mp / "tasks"
    ids = [f"{tag}_{i}" for i in range(len(prompts))]
    more = "".join(f"{line}\n" for line in TASK_CONFIG) if extra is None else extra
    config = f"max_tokens {max_tokens}\ntemperature 0\n{more}"
    for tid in ids:
        (tasks / tid).mkdir()
        (tasks / tid / "config").write_text(config)
    submitted, others, cpu = [], others_meter(daemon), cpu_meter(daemon)
    first, exited = [0.0] * len(ids), [0.0] * len(ids)  # each cat's first byte, its exit

    def read(cat: subprocess.Popen[bytes], i: int) -> None:
        out = cat.stdout
        assert out is not None
        if out.read(1):
            first[i] = time.time()
        out.read()
        cat.wait()
        exited[i] = time.time()

    # Each cat is started, and read, as soon as its task is submitted (a draft's stream
    # ends at once): a cat that waited for the others to start would add their start to
    # its time to first token.
    with ThreadPoolExecutor(len(ids)) as pool:
        for i, (tid, p) in enumerate(zip(ids, prompts, strict=True)):
            submitted.append(time.time())
            fd = os.open(tasks / tid / "prompt", os.O_WRONLY)
            os.write(fd, PROMPTS[p].encode())
            os.close(fd)  # submits
            cat = subprocess.Popen(["cat", str(tasks / tid / "stream")], stdout=subprocess.PIPE,
                                   bufsize=0)
            pool.submit(read, cat, i)
    share, used = others(), cpu()
    trace = trace_times(mp)
    requests = []
    for i, (tid, p) in enumerate(zip(ids, prompts, strict=True)):
        status = key_values(tasks / tid / "status")
        if status["state"] != "done" or not first[i]:
            raise RuntimeError(f"task {tid}: {status['state']}, {status['finish_reason']}")
        ttft = (first[i] - submitted[i]) * 1000
        queued, to_token = float(status["queued_ms"]), float(status["first_token_ms"])
        to_submit = (trace[(tid, "submit")] - submitted[i]) * 1000
        stages = dict(zip(STAGES, (to_submit, queued, to_token - queued,
                                   ttft - to_submit - to_token), strict=True))
        requests.append(Request(p, ttft, int(status["generated_tokens"]), stages))
    return Round(max(exited) - submitted[0], requests, share, used)
