"""The kernel's part that changes ``models/``: registering model files (``ln -s``,
``cp``), remote models (``mkdir``), removing them and their ``ctl`` commands.

A mixin of axfs.kernel.Kernel, kept apart for size; what it uses of the kernel is
declared below. A model file is a path a user names, so it is read only off the trio
thread (axfs.userfiles) and what the tree shows of it (models/NAME/info) is what was
last read, never a read made while a request waits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from axfs import userfiles
from axfs.config import TaskConfig
from axfs.errors import AxfsError, BadInput, Busy, NotFound, Unavailable
from axfs.models import ModelCopy, ModelEntry, Registry, RemoteSpec, gguf_info, name_for_file, parse_remote
from axfs.trace import Trace
from drivers import chat
from drivers.credentials import read_key, tls_context
from drivers.gguf import GgufInfo

if TYPE_CHECKING:
    from axfs.runtime import Runtime

COPY_TRACE_BYTES = 64 << 20  # a model copy's progress is traced this often


async def check_access(spec: RemoteSpec) -> None:
    """BadInput saying why ``spec``'s key file or CA file cannot be used."""
    try:
        if spec.key_file:
            await userfiles.call(read_key, spec.key_file)
        if spec.ca_file:
            await userfiles.call(tls_context, spec.ca_file)
    except (OSError, ValueError) as e:
        raise BadInput(f"endpoints: {e}") from e


class ModelControl:
    registry: Registry
    trace: Trace
    copy_dir: Path | None
    defaults: TaskConfig
    _nursery: trio.Nursery | None
    _load_errors: dict[str, str]
    _infos: dict[str, GgufInfo | str]  # name -> its GGUF header's facts, or why not read

    if TYPE_CHECKING:
        def in_use(self, name: str) -> int: ...
        def unload(self, name: str, reason: str = "ctl") -> None: ...
        async def runtime(self, name: str) -> Runtime: ...

    @contextlib.contextmanager
    def _refused(self, name: str, uid: int | str) -> Iterator[None]:
        """Record why a change to models/ by ``uid`` was refused (the trace) and let it through."""
        try:
            yield
        except AxfsError as e:
            self.trace.emit("reject", "-", uid, model=name, reason=str(e))
            raise

    async def register(self, name: str, path: str, copied: bool = False,
                       uid: int | str = "-") -> ModelEntry:
        """``ln -s FILE models/NAME``, or the end of ``cp FILE models/``. The file is read
        off the trio thread (axfs.userfiles): a FIFO, a device or a hung filesystem is
        refused with the reason, never waited on."""
        with self._refused(name, uid):
            self.registry.check_new(name)
            if not os.path.isabs(path):
                raise BadInput(f"{path}: the link must be an absolute path")
            try:
                info = await userfiles.call(gguf_info, path)
            except (OSError, ValueError) as e:
                raise BadInput(f"{path}: not a model file ({e})") from e
            self.registry.check_new(name)  # taken meanwhile?
            self._infos[name] = info
            entry = self.registry.add(ModelEntry(name, path=path, copied=copied))
            self.trace.emit("model_add", model=name, path=path, parameters=info.parameters,
                            copied="yes" if copied else "no")
            self.defaults.model = self.registry.default
            return entry

    def begin_copy(self, filename: str, uid: int | str = "-") -> ModelCopy:
        """``cp FILE models/``: the copy is written into the state directory."""
        with self._refused(filename, uid):
            if self.copy_dir is None:
                raise BadInput("this mount keeps no model copies (no state directory)")
            name = self.registry.check_new(name_for_file(filename))
            copy = ModelCopy(filename, self.copy_dir)
            self.trace.emit("model_copy", model=name, to=str(copy.final))
            return copy

    def copy_wrote(self, copy: ModelCopy, before: int) -> None:
        """Trace a copy's progress every COPY_TRACE_BYTES."""
        if copy.size // COPY_TRACE_BYTES > before // COPY_TRACE_BYTES:
            self.trace.emit("model_copy", model=copy.name, bytes=copy.size)

    async def register_copy(self, copy: ModelCopy, uid: int | str = "-") -> ModelEntry:
        """A finished copy (``ModelCopy.finish``): registered if it is a model file."""
        try:
            return await self.register(copy.name, str(copy.final), copied=True, uid=uid)
        except AxfsError as e:
            copy.abort()
            why = f"copy of model {copy.name} refused: {e}"
            self.trace.emit("error", "-", uid, model=copy.name, reason=why)
            raise BadInput(why) from e

    def add_remote(self, name: str, uid: int | str = "-") -> ModelEntry:
        """``mkdir models/NAME``: a model whose endpoints are written to its ctl next."""
        with self._refused(name, uid):
            entry = self.registry.add(ModelEntry(self.registry.check_new(name)))
            self.trace.emit("model_add", model=name, remote="yes")
            return entry

    def unregister(self, name: str, uid: int | str = "-") -> None:
        """``rm -r models/NAME``: refused while tasks use it."""
        with self._refused(name, uid):
            if name not in self.registry.entries:
                raise NotFound(f"no model named {name!r}")
            busy = self.in_use(name)
            if busy:
                raise Busy(f"model {name} has {busy} unfinished tasks")
            if name == self.registry.default:
                raise Busy(f"model {name} is the default: make another the default first"
                           if len(self.registry.entries) > 1 else f"model {name} is the only model")
            self.unload(name, reason="rm")
            self.registry.remove(name)
            self._infos.pop(name, None)
            self.defaults.model = self.registry.default
            self.trace.emit("model_remove", model=name)

    async def model_control(self, name: str, text: str, uid: int | str = "-") -> None:
        """One command written to models/NAME/ctl. ``endpoints``' key and CA files are
        read here (off the trio thread), so that a bad one is refused with the reason."""
        with self._refused(name, uid):
            entry = self.registry.entries.get(name)
            if entry is None:
                raise NotFound(f"no model named {name!r}")
            words = text.split()
            verb, args = (words[0], words[1:]) if words else ("", [])
            if verb == "load" and not args:
                if self._nursery is None:
                    raise Unavailable("the kernel is not running")
                if not entry.configured:
                    raise BadInput(f"model {name} has no file or endpoints yet")
                self._nursery.start_soon(self._load_quietly, name)
            elif verb == "unload" and not args:
                self.unload(name)
            elif verb == "default" and not args:
                self.registry.default = name
                self.registry.save()
                self.defaults.model = name
                self.trace.emit("model_default", model=name)
            elif verb == "endpoints" and args:
                if entry.path:
                    raise BadInput(f"model {name} is a local file; endpoints are for remote models")
                spec = parse_remote(args)
                await check_access(spec)
                if self.in_use(name):
                    raise Busy(f"model {name} has unfinished tasks")
                self.unload(name, reason="endpoints")
                entry.endpoints, entry.key_file, entry.ca_file = spec.endpoints, spec.key_file, spec.ca_file
                self.registry.save()
                self.trace.emit("model_endpoints", model=name, endpoints=",".join(spec.endpoints),
                                key_file=spec.key_file or "-", ca_file=spec.ca_file or "-")
            elif verb == "gpu_layers" and len(args) == 1 and (
                    args[0] == "auto" or (args[0].isascii() and args[0].isdigit())):
                entry.gpu_layers = None if args[0] == "auto" else int(args[0])
                self.registry.save()
            elif verb == "template" and len(args) <= 1:
                if args and args[0] not in chat.builtin_names():
                    raise BadInput(f"template: unknown name {args[0]!r} (known: "
                                   f"{', '.join(chat.builtin_names())})")
                entry.template = args[0] if args else ""
                self.registry.save()
            else:
                raise BadInput(f"models/{name}/ctl: cannot parse {text.strip()[:60]!r} (commands: load, "
                               "unload, default, endpoints URL... [key=PATH] [ca=PATH], gpu_layers N|auto, "
                               "template [NAME])")

    async def _load_quietly(self, name: str) -> None:
        with contextlib.suppress(AxfsError):  # the reason is in the trace and in info
            await self.runtime(name)

    def load_error(self, name: str) -> str:
        return self._load_errors.get(name, "")

    def file_info(self, name: str) -> GgufInfo | str:
        """What model ``name``'s GGUF header says, as last read (``refresh_info``), or why
        it could not be read. Never reads the file: the trio thread calls it."""
        return self._infos.get(name, "not read yet")

    async def refresh_info(self, name: str) -> None:
        """Read model ``name``'s GGUF header again if the file changed (off the trio
        thread, within axfs.userfiles' time limit)."""
        entry = self.registry.entries.get(name)
        if entry is None or not entry.path:
            return
        try:
            self._infos[name] = await userfiles.call(gguf_info, entry.path)
        except (OSError, ValueError) as e:
            self._infos[name] = str(e)

