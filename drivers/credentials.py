"""What a pool of remote endpoints needs to reach them the way they are deployed: an API
key sent as ``Authorization: Bearer``, and a TLS context that checks an ``https://``
endpoint's certificate (against a given CA file, or the system's CAs).

Both files are named by the administrator (the mount's ``--remote`` or a model's ctl) and
read here, in a worker thread: each is opened as drivers.files does, regular files only.
A key file must belong to the user axfs runs as and be readable by nobody else; a key
file readable by its group or others is refused with the reason. The key itself never
appears in an error: only the file's path does.
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass, field

from drivers.files import open_regular

MAX_FILE_BYTES = 1 << 20  # a key or a CA bundle larger than this is not one


@dataclass(frozen=True, slots=True)
class Access:
    """How a pool reaches its endpoints: ``tls`` checks https certificates, ``key`` is
    sent as a bearer token ("" sends none). The key is kept out of repr."""

    tls: ssl.SSLContext
    key: str = field(default="", repr=False)


def _read(path: str) -> tuple[bytes, os.stat_result]:
    with os.fdopen(open_regular(path), "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    return data, st


def read_private(path: str, what: str) -> bytes:
    """The content of ``path``, a file only the user axfs runs as may read (a key file,
    the HTTP face's keys file: ``what`` names it in errors). ValueError (or OSError)
    saying why not, without the file's content."""
    data, st = _read(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ValueError(f"{what} {path} is mode {mode:04o}: its group and others may read it; "
                         f"it must be readable by its owner only (chmod 600 {path})")
    if st.st_uid != os.geteuid():
        raise ValueError(f"{what} {path} belongs to uid {st.st_uid}, not to uid {os.geteuid()} "
                         "that axfs runs as")
    return data


def read_key(path: str) -> str:
    """The API key in file ``path``: one line of printable characters. ValueError (or
    OSError) saying why not, without the file's content."""
    data = read_private(path, "key file")
    key = data.strip()
    if not key or any(not 0x21 <= b <= 0x7E for b in key):
        raise ValueError(f"key file {path} does not hold a key: expected one line of printable "
                         "characters without spaces")
    return key.decode("ascii")


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """A client TLS context that checks certificates and host names: against the PEM
    certificates in ``ca_file``, or the system's CAs when it is "". ValueError (or
    OSError) when the file holds no certificate."""
    if not ca_file:
        return ssl.create_default_context()
    data, _ = _read(ca_file)
    try:
        return ssl.create_default_context(cadata=data.decode("ascii", "replace"))
    except ssl.SSLError as e:
        raise ValueError(f"CA file {ca_file} holds no PEM certificate ({e.reason or e})") from None
