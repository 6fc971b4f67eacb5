"""The registry's operations, what changes ``models/``: registering model files (``ln -s``,
``cp``), remote models (``mkdir``), removing them, and the commands of ``models/NAME/ctl``.

A model file is a path a user names, so it is read only off the trio thread
(axfs.userfiles) and what the tree shows of it (models/NAME/info) is what was last
read, never a read made while a request waits.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from axfs import ctl, userfiles
from axfs.config import TaskConfig
from axfs.errors import AxfsError, BadInput, Busy, NotFound
from axfs.loading import Loading
from axfs.models import ModelCopy, ModelEntry, Registry, RemoteSpec, gguf_info, name_for_file, parse_remote
from axfs.trace import Event
from drivers import chat
from drivers.credentials import read_key, tls_context
from drivers.gguf import GgufInfo

COPY_TRACE_BYTES = 64 << 20  # a model copy's progress is traced this often

COMMANDS = (  # models/NAME/ctl
    ctl.Verb("load"),
    ctl.Verb("unload"),
    ctl.Verb("default"),
    ctl.Verb("endpoints", "URL [slots=N]... [key=PATH] [ca=PATH]", least=1, most=None),
    ctl.Verb("gpu_layers", "N|auto", least=1, most=1, pattern=re.compile(r"auto|[0-9]+")),
    ctl.Verb("template", "[NAME]", most=1),
)


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
    """Changes to the registry; ``defaults`` (tasks' default config) follows its default
    model, and ``loading`` loads and unloads what it names."""

    def __init__(self, registry: Registry, loading: Loading, defaults: TaskConfig,
                 copy_dir: Path | None = None) -> None:
        self.registry = registry
        self.loading = loading
        self.trace = loading.trace
        self.defaults = defaults
        self.copy_dir = copy_dir  # where `cp FILE models/` puts its copies
        self._infos: dict[str, GgufInfo | str] = {}  # name -> its GGUF header's facts, or why not read

    @contextlib.contextmanager
    def _refused(self, name: str, uid: int | str) -> Iterator[None]:
        """Record why a change to models/ by ``uid`` was refused (the trace) and let it through."""
        try:
            yield
        except AxfsError as e:
            self.trace.emit(Event.REJECT, "-", uid, model=name, reason=str(e))
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
            self.trace.emit(Event.MODEL_ADD, model=name, path=path, parameters=info.parameters,
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
            self.trace.emit(Event.MODEL_COPY, model=name, to=str(copy.final))
            return copy

    def copy_wrote(self, copy: ModelCopy, before: int) -> None:
        """Trace a copy's progress every COPY_TRACE_BYTES."""
        if copy.size // COPY_TRACE_BYTES > before // COPY_TRACE_BYTES:
            self.trace.emit(Event.MODEL_COPY, model=copy.name, bytes=copy.size)

    async def register_copy(self, copy: ModelCopy, uid: int | str = "-") -> ModelEntry:
        """A finished copy (``ModelCopy.finish``): registered if it is a model file."""
        try:
            return await self.register(copy.name, str(copy.final), copied=True, uid=uid)
        except AxfsError as e:
            copy.abort()
            why = f"copy of model {copy.name} refused: {e}"
            self.trace.emit(Event.ERROR, "-", uid, model=copy.name, reason=why)
            raise BadInput(why) from e

    def add_remote(self, name: str, uid: int | str = "-") -> ModelEntry:
        """``mkdir models/NAME``: a model whose endpoints are written to its ctl next."""
        with self._refused(name, uid):
            entry = self.registry.add(ModelEntry(self.registry.check_new(name)))
            self.trace.emit(Event.MODEL_ADD, model=name, remote="yes")
            return entry

    def unregister(self, name: str, uid: int | str = "-") -> None:
        """``rm -r models/NAME``: refused while tasks use it."""
        with self._refused(name, uid):
            if name not in self.registry.entries:
                raise NotFound(f"no model named {name!r}")
            busy = len(self.loading.unfinished(name))
            if busy:
                raise Busy(f"model {name} has {busy} unfinished tasks")
            if name == self.registry.default:
                raise Busy(f"model {name} is the default: make another the default first"
                           if len(self.registry.entries) > 1 else f"model {name} is the only model")
            self.loading.unload(name, reason="rm")
            self.registry.remove(name)
            self._infos.pop(name, None)
            self.defaults.model = self.registry.default
            self.trace.emit(Event.MODEL_REMOVE, model=name)

    async def control(self, name: str, text: str, uid: int | str = "-") -> None:
        """One command written to models/NAME/ctl (``COMMANDS``). ``endpoints``' key and
        CA files are read here (off the trio thread), so that a bad one is refused with
        the reason."""
        with self._refused(name, uid):
            entry = self.registry.entries.get(name)
            if entry is None:
                raise NotFound(f"no model named {name!r}")
            command = ctl.parse(COMMANDS, f"models/{name}/ctl", text)
            args = command.args
            if command.verb == "load":
                self.loading.load_soon(entry)
            elif command.verb == "unload":
                self.loading.unload(name)
            elif command.verb == "default":
                self.registry.default = name
                self.registry.save()
                self.defaults.model = name
                self.trace.emit(Event.MODEL_DEFAULT, model=name)
            elif command.verb == "endpoints":
                await self._set_endpoints(entry, args)
            elif command.verb == "gpu_layers":
                entry.gpu_layers = None if args[0] == "auto" else int(args[0])
                self.registry.save()
            elif command.verb == "template":
                if args and args[0] not in chat.builtin_names():
                    raise BadInput(f"{command.where}: unknown template {args[0]!r} (known: "
                                   f"{', '.join(chat.builtin_names())})")
                entry.template = args[0] if args else ""
                self.registry.save()

    async def _set_endpoints(self, entry: ModelEntry, args: list[str]) -> None:
        name = entry.name
        if entry.path:
            raise BadInput(f"model {name} is a local file; endpoints are for remote models")
        spec = parse_remote(args)
        await check_access(spec)
        if self.loading.unfinished(name):
            raise Busy(f"model {name} has unfinished tasks")
        self.loading.unload(name, reason="endpoints")
        entry.set_remote(spec)
        self.registry.save()
        self.trace.emit(Event.MODEL_ENDPOINTS, model=name, endpoints=",".join(spec.endpoints),
                        slots=",".join(f"{url}={n}" for url, n in spec.slots.items()) or "-",
                        key_file=spec.key_file or "-", ca_file=spec.ca_file or "-")

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

