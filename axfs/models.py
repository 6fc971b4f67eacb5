"""The registered models: what ``/ax/models`` lists, kept in ``STATE_DIR/models.json``.

A model is a name and either a local GGUF file (registered by ``ln -s FILE
models/NAME``, by ``cp FILE models/`` into the state directory, or by the mount's
``--model``) or a list of OpenAI-compatible endpoints (``mkdir models/NAME`` then
``endpoints URL [slots=N]... [key=PATH] [ca=PATH]`` written to its ``ctl``). This module
only keeps the list; loading and unloading are the kernel's (axfs.kernel), running is a
runtime's (axfs.runtime, axfs.remote).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from axfs.errors import BadInput, Exists
from drivers.gguf import GgufInfo, read_info
from drivers.openai import parse_url

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SUFFIX = ".gguf"
MAX_SLOTS = 4096  # the most requests one endpoint may be given at once


def gguf_info(path: str) -> GgufInfo:
    """A GGUF's header facts, read once per version of the file: reading Gemma's (a
    262,144-token vocabulary) takes a third of a second, and `ls -l models/` renders info.
    OSError or ValueError (with the reason) when it is not a readable GGUF file."""
    st = os.stat(path)
    return _gguf_info(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _gguf_info(path: str, size: int, mtime_ns: int) -> GgufInfo:
    return read_info(Path(path))


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise BadInput(f"bad model name {name!r}: 1-64 of A-Z a-z 0-9 . _ - beginning with a "
                       "letter or digit")
    return name


def name_for_file(filename: str) -> str:
    """``cp x.gguf models/`` registers ``x``: the name less a ``.gguf`` suffix."""
    return filename[: -len(SUFFIX)] if filename.lower().endswith(SUFFIX) else filename


@dataclass(slots=True)
class ModelEntry:
    """One registered model; the fields after ``name`` are what models.json keeps."""

    name: str
    path: str = ""  # a local GGUF file
    endpoints: list[str] = field(default_factory=list)  # or OpenAI-compatible servers
    key_file: str = ""  # their API key's file (RemoteSpec)
    ca_file: str = ""  # the CAs their certificates are checked against ("" the system's)
    slots: dict[str, int] = field(default_factory=dict)  # url -> requests it runs at once, as set
    copied: bool = False  # path is axfs's own copy (STATE_DIR/models), deleted with the entry
    gpu_layers: int | None = None  # None: chosen from the GPU's free memory
    template: str = ""  # chat template in place of the GGUF's (a llama.cpp built-in name)

    @property
    def remote(self) -> bool:
        return bool(self.endpoints)

    @property
    def configured(self) -> bool:
        return bool(self.path or self.endpoints)

    def set_remote(self, spec: RemoteSpec) -> None:
        """Serve it from ``spec``'s endpoints, reached with its files."""
        self.endpoints, self.key_file, self.ca_file = spec.endpoints, spec.key_file, spec.ca_file
        self.slots = dict(spec.slots)


class Registry:
    """The registered models and which one is the default, saved on every change."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path  # None: kept in memory only (tests)
        self.entries: dict[str, ModelEntry] = {}
        self.default = ""

    def load(self) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("cannot read %s (%s): starting with no registered models", self.path, e)
            return
        for raw in data.get("models", []):
            try:
                entry = ModelEntry(**raw)
                self.entries[check_name(entry.name)] = entry
            except (TypeError, BadInput) as e:
                log.error("%s: skipping a bad entry %r (%s)", self.path, raw, e)
        default = data.get("default", "")
        self.default = default if default in self.entries else ""

    def save(self) -> None:
        if self.path is None:
            return
        data = {"default": self.default, "models": [asdict(e) for e in self.entries.values()]}
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            log.error("cannot write %s: %s", self.path, e)

    def check_new(self, name: str) -> str:
        """``name`` if a new model may take it; BadInput or Exists saying why not."""
        if check_name(name) in self.entries:
            raise Exists(f"model {name} exists")
        return name

    def add(self, entry: ModelEntry) -> ModelEntry:
        self.entries[entry.name] = entry
        if not self.default:
            self.default = entry.name
        self.save()
        return entry

    def remove(self, name: str) -> ModelEntry:
        entry = self.entries.pop(name)
        if self.default == name:
            self.default = next(iter(self.entries), "")
        self.save()
        if entry.copied:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        return entry

    def find_path(self, path: str) -> ModelEntry | None:
        """The entry already registered for this file, if any."""
        real = os.path.realpath(path)
        return next((e for e in self.entries.values()
                     if e.path and os.path.realpath(e.path) == real), None)


@dataclass(frozen=True, slots=True)
class RemoteSpec:
    """A remote model's endpoints and the files it reaches them with: what follows
    ``endpoints`` in its ctl (``URL [slots=N]... [key=PATH] [ca=PATH]``, words apart) or
    ``NAME=`` in the mount's ``--remote`` (the same words, commas apart)."""

    endpoints: list[str]
    key_file: str = ""  # the API key, sent as Authorization: Bearer
    ca_file: str = ""  # the CAs that https endpoints' certificates are checked against
    slots: dict[str, int] = field(default_factory=dict)  # url -> its slots, where set


def parse_remote(words: Sequence[str]) -> RemoteSpec:
    """URLs (http:// or https://, optionally ending in /v1), each optionally followed by
    ``slots=N`` (how many requests it runs at once, 1 to MAX_SLOTS), and at most one
    ``key=PATH`` and one ``ca=PATH``, absolute paths; BadInput saying what is wrong. The
    files are read where the model is loaded (axfs.remote)."""
    urls: list[str] = []
    files = {"key": "", "ca": ""}
    slots: dict[str, int] = {}
    for word in words:
        option, is_option, path = word.partition("=")
        if option == "slots" and is_option:
            slots.update(_slots(urls, slots, path))
            continue
        if is_option and "://" not in option:
            if option not in files:
                raise BadInput(f"endpoints: unknown option {option!r} "
                               "(options: slots=N after a URL, key=PATH, ca=PATH)")
            if files[option]:
                raise BadInput(f"endpoints: {option}= given twice")
            if not os.path.isabs(path):
                raise BadInput(f"endpoints: {option}={path}: expected an absolute path")
            files[option] = path
            continue
        try:
            parse_url(word)
        except ValueError as e:
            raise BadInput(str(e)) from None
        urls.append(word)
    if not urls:
        raise BadInput("endpoints: expected URL... [key=PATH] [ca=PATH]")
    if files["ca"] and not any(url.strip().startswith("https:") for url in urls):
        raise BadInput("endpoints: ca= is for https:// endpoints")
    return RemoteSpec(urls, files["key"], files["ca"], slots)


def _slots(urls: list[str], slots: dict[str, int], value: str) -> dict[str, int]:
    """``slots=VALUE`` for the URL just before it."""
    if not urls or urls[-1] in slots:
        raise BadInput("endpoints: slots=N follows the URL it is for (URL slots=N)")
    if not value.isdigit() or not 1 <= int(value) <= MAX_SLOTS:
        raise BadInput(f"endpoints: slots={value}: expected a number from 1 to {MAX_SLOTS}")
    return {urls[-1]: int(value)}


class ModelCopy:
    """A model file being copied in by ``cp FILE models/``: written to NAME.gguf.part in
    the copy directory and renamed to NAME.gguf when the writer closes it."""

    def __init__(self, filename: str, directory: Path) -> None:
        self.filename = filename  # as cp names it (x.gguf)
        self.name = check_name(name_for_file(filename))
        self.final = directory / f"{self.name}{SUFFIX}"
        self.part = directory / f"{self.name}{SUFFIX}.part"
        directory.mkdir(parents=True, exist_ok=True)
        # Not through a link or into a FIFO someone put there: nothing may wait here.
        self.fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                          | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        self.size = 0
        self.done = False

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        self.size = max(self.size, offset + len(data))

    def finish(self) -> Path:
        """Close and move into place; the caller registers it (or calls ``abort``)."""
        self.done = True
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.part, self.final)
        return self.final

    def abort(self) -> None:
        self.done = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for path in (self.part, self.final):
            with contextlib.suppress(OSError):
                path.unlink()
