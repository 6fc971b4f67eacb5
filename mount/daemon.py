"""Serving a mounted tree: load the model, build the kernel, run FUSE and the engine.

``serve`` runs in the foreground until the tree is unmounted, SIGTERM or SIGINT.
It reports readiness (or why it failed) through ``ready``, which ``axfs mount``
uses to return only once the tree answers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from axfs.errors import BadInput
from axfs.fs.operations import Operations
from axfs.http import server as http_server
from axfs.http.callers import Callers
from axfs.journal import Journal
from axfs.kernel import Kernel
from axfs.models import ModelEntry, Registry, check_name, name_for_file, parse_remote
from axfs.persist import Keeper, Retention, file_sha256
from axfs.quota import Quota, parse_limits
from axfs.swap import SwapSpace
from drivers.base import ModelLoadError
from drivers.credentials import read_key, tls_context
from drivers.files import open_regular
from drivers.llamacpp import LlamaCppDriver

log = logging.getLogger(__name__)

MAX_FUSE_REQUESTS = 4096  # blocked stream readers each hold one worker task
# Idle worker tasks pyfuse3 keeps. It ends a worker that finishes a request while more
# than this many wait for the next one, and starts one when none waits: with the default
# handful, every stream read of a busy tree (each parks its worker until text comes)
# started and ended a trio task. Idle ones cost a few hundred bytes each.
IDLE_FUSE_WORKERS = 512


class MountError(Exception):
    """The tree cannot be mounted; the message says why."""


@dataclass(slots=True)
class MountOptions:
    mountpoint: Path
    model: Path
    state_dir: Path
    n_ctx: int = 8192
    slots: int = 32
    n_batch: int = 512
    threads: int | None = None
    repack: bool | None = None  # None: llama.cpp's repacked weights unless the CPU has AMX
    deterministic: bool = True  # batch-invariant tokens where it can be had (CPU models)
    policy: str = "fair"
    allow_other: bool = False
    multi_user: bool = False  # allow_other, and each task its owner's only (0700)
    limits: tuple[str, ...] = ()  # --limit values, "[UID:]KEY=N"
    prefix_cache: bool = True
    swap_mem: int = 512 << 20  # bytes of preempted sequences kept in memory; more go to disk
    keep_tasks: int = 1000  # finished tasks kept in the tree and the journal
    keep_days: float = 7.0  # ... and for how long
    journal: bool = True
    cache_cells: int | None = None  # cells of ended tasks' KV kept, at most (None: ctx/4)
    gpu_layers: int | None = None  # the default model's; None: its models/NAME/ctl setting, else auto
    idle_unload: float = 600.0  # seconds a model other than the default stays loaded idle (0: never)
    remote: tuple[str, ...] = ()  # --remote values, "NAME=URL[,slots=N][,URL...][,key=PATH][,ca=PATH]"
    overlap: bool | None = None  # a step's text published while the next runs (None: on a GPU)
    http: http_server.HttpOptions | None = None  # --http: the OpenAI-compatible server (axfs.http)


def prepare_mountpoint(mountpoint: Path) -> None:
    """Make ``mountpoint`` ready: created if missing, a crashed daemon's mount cleared."""
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        try:
            mountpoint.mkdir(parents=True)
        except OSError as e:
            raise MountError(f"cannot create {mountpoint}: {e.strerror}") from e
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise MountError(f"cannot use {mountpoint}: {e.strerror}") from e
        # 'Transport endpoint is not connected': the daemon behind it died.
        log.warning("clearing a stale mount at %s", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                       capture_output=True)
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point (axfs umount it first)")
    if not mountpoint.is_dir():
        raise MountError(f"{mountpoint} is not a directory")


def serve(opts: MountOptions, ready: Callable[[str], None]) -> int:
    """Mount and serve until unmounted or signalled; returns the exit status."""
    try:
        quota = Quota(*parse_limits(list(opts.limits)))
        opts.state_dir.mkdir(parents=True, exist_ok=True)
        if opts.multi_user:  # its journal, swap files and log hold every user's prompts
            opts.state_dir.chmod(0o700)
        prepare_mountpoint(opts.mountpoint)
        registry = open_registry(opts)
        entry = default_entry(registry, opts.model)
        if opts.gpu_layers is not None:
            entry.gpu_layers = opts.gpu_layers
            registry.save()
        callers = http_server.load_callers(opts.http) if opts.http else None
        loader = make_loader(opts)
        driver = loader(entry)
    except (MountError, ModelLoadError, BadInput) as e:
        ready(f"error: {e}")
        return 1
    except (OSError, ValueError) as e:
        ready(f"error: {e}")
        return 1
    try:
        keeper = Keeper(Journal(opts.state_dir), file_sha256(opts.model, opts.state_dir),
                        Retention(opts.keep_tasks, opts.keep_days * 86400)) if opts.journal else None
        kernel = Kernel(driver, policy=opts.policy, prefix_cache=opts.prefix_cache,
                        cache_limit=opts.cache_cells,
                        swap=SwapSpace(opts.swap_mem, opts.state_dir / "swap"), keeper=keeper,
                        quota=quota, registry=registry, loader=loader,
                        sha_of=lambda path: file_sha256(Path(path), opts.state_dir),
                        idle_unload_s=opts.idle_unload, copy_dir=opts.state_dir / "models",
                        overlap=opts.overlap)
        ops = Operations(kernel, multi_user=opts.multi_user)
        options = set(pyfuse3.default_options) | {"fsname=axfs", "subtype=axfs"}
        if opts.allow_other or opts.multi_user:
            options.add("allow_other")
        try:
            pyfuse3.init(ops, str(opts.mountpoint), options)
        except RuntimeError as e:
            ready(f"error: cannot mount {opts.mountpoint}: {e}")
            return 1
        try:
            if not trio.run(_main, kernel, ready, opts, callers):
                return 1
        finally:
            kernel.close()
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
    finally:
        driver.close()
    log.info("unmounted %s", opts.mountpoint)
    return 0


def open_registry(opts: MountOptions) -> Registry:
    """STATE_DIR/models.json, with the mount's --remote models written into it."""
    registry = Registry(opts.state_dir / "models.json")
    registry.load()
    for spec in opts.remote:
        name, _, words = spec.partition("=")
        try:
            remote = parse_remote([w for w in words.split(",") if w])
            if remote.key_file:
                read_key(remote.key_file)  # refused at mount, with the reason
            if remote.ca_file:
                tls_context(remote.ca_file)
        except (BadInput, OSError, ValueError) as e:
            raise BadInput(f"--remote {spec}: {e}") from e
        entry = registry.entries.get(check_name(name))
        if entry is not None and entry.path:
            raise BadInput(f"--remote {spec}: {name} is a local model")
        if entry is None:
            entry = registry.add(ModelEntry(name))
        entry.set_remote(remote)
    registry.save()
    return registry


def default_entry(registry: Registry, model: Path) -> ModelEntry:
    """The entry of the mount's --model, registered under its file's stem if it is new; it
    becomes the default model."""
    entry = registry.find_path(str(model))
    if entry is None:
        name, n = name_for_file(model.name), 1
        while name in registry.entries:
            n += 1
            name = f"{name_for_file(model.name)}-{n}"
        entry = registry.add(ModelEntry(check_name(name), path=str(model)))
    registry.default = entry.name
    registry.save()
    return entry


def make_loader(opts: MountOptions) -> Callable[[ModelEntry], LlamaCppDriver]:
    """How a local model is loaded: each with the mount's context, slots and threads."""

    def load(entry: ModelEntry) -> LlamaCppDriver:
        with contextlib.suppress(FileNotFoundError):  # which the driver words itself
            os.close(open_regular(entry.path))  # llama.cpp would wait on a FIFO (drivers.files)
        return LlamaCppDriver(Path(entry.path), name=entry.name, n_ctx=opts.n_ctx,
                              n_seq_max=opts.slots, n_batch=opts.n_batch, n_threads=opts.threads,
                              repack=opts.repack, gpu_layers=entry.gpu_layers,
                              deterministic=opts.deterministic)

    return load


async def _main(kernel: Kernel, ready: Callable[[str], None], opts: MountOptions,
                callers: Callers | None) -> bool:
    """Serve the tree (and with --http, the HTTP server) until unmounted; False when it
    could not start (``ready`` was told why)."""
    kernel.restore()  # the journaled tasks are back before the first request is served
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kernel.run)
        nursery.start_soon(_on_signals)
        if opts.http is not None and callers is not None:
            try:
                urls = await nursery.start(http_server.serve, kernel, opts.http, callers, opts.multi_user)
            except OSError as e:
                ready(f"error: --http {opts.http.bind}: {e.strerror or e}")
                nursery.cancel_scope.cancel()
                return False
            log.info("http: serving on %s", " ".join(urls))
        ready("ready")
        await pyfuse3.main(min_tasks=IDLE_FUSE_WORKERS, max_tasks=MAX_FUSE_REQUESTS)
        nursery.cancel_scope.cancel()
    return True


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
