"""Who is asking: ``Authorization: Bearer KEY`` mapped to a uid by the mount's keys file,
so that the uid's shares, priority and limits apply to its requests as to its writes.

The keys file (``--http-keys FILE``) has one ``KEY UID`` line a key (UID a number or a
user's name; blank lines and ``#`` comments are skipped). Like a remote model's key file
(drivers.credentials) it must belong to the user axfs runs as and be readable by nobody
else, or the mount is refused with the reason. The keys are kept as their SHA-256 only
and never appear in an error, the trace, the journal or the log: a refusal names the
file and the line, never the key.

Without a keys file every request is the mount owner's (the uid axfs runs as), and the
server listens on loopback only (axfs.http.server). With one, a request without a known
key is refused (401), except, where the mount says ``--http-open-loopback``, one from a
loopback address, which is the owner's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import pwd
from dataclasses import dataclass

from starlette.requests import Request

from drivers.credentials import read_private

MIN_KEY_CHARS = 16  # a key shorter than this can be guessed


class Unauthorized(Exception):
    """The request has no key the mount knows (HTTP 401); the message says why."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Whose request it is: its tasks are that uid's."""

    uid: int
    gid: int


def caller(uid: int) -> Caller:
    """``uid`` with its primary group (its own number where it has no passwd entry)."""
    try:
        return Caller(uid, pwd.getpwuid(uid).pw_gid)
    except KeyError:
        return Caller(uid, uid)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys(path: str) -> dict[bytes, int]:
    """The keys file at ``path``: each key's SHA-256 -> its uid. ValueError (or OSError)
    saying what is wrong, without any key."""
    data = read_private(path, "keys file")
    keys: dict[bytes, int] = {}
    for n, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"keys file {path} line {n}"
        if len(words) != 2:
            raise ValueError(f"{where}: expected KEY UID")
        key, who = words
        if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable():
            raise ValueError(f"{where}: a key is at least {MIN_KEY_CHARS} printable ASCII characters")
        digest = _digest(key)
        if digest in keys:
            raise ValueError(f"{where}: the same key as an earlier line")
        keys[digest] = _uid(who, where)
    if not keys:
        raise ValueError(f"keys file {path} has no key (lines: KEY UID)")
    return keys


def _uid(who: str, where: str) -> int:
    if who.isdigit():
        return int(who)
    try:
        return pwd.getpwnam(who).pw_uid
    except KeyError:
        raise ValueError(f"{where}: no user {who!r}") from None


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class Callers:
    """Who a request is: by its key (``keys``: a key's SHA-256 -> uid), else the owner's
    where that is allowed (no keys at all; or a loopback client with ``open_loopback``)."""

    def __init__(self, keys: dict[bytes, int] | None, open_loopback: bool = False,
                 owner: int | None = None) -> None:
        self.keys = keys
        self.open_loopback = open_loopback
        self.owner = caller(os.geteuid() if owner is None else owner)

    def who(self, authorization: str | None, client: str | None) -> Caller:
        """The caller of a request with this ``Authorization`` header from address
        ``client``; Unauthorized saying why when it has no known key and needs one."""
        if self.keys is None:
            return self.owner
        scheme, _, key = (authorization or "").partition(" ")
        given = scheme.lower() == "bearer" and key.strip()
        uid = self.keys.get(_digest(key.strip())) if given else None
        if uid is not None:
            return caller(uid)
        if self.open_loopback and is_loopback(client):  # a client's placeholder key too
            return self.owner
        if given:
            raise Unauthorized("the API key is not one this server knows")
        raise Unauthorized("an API key is needed: send the header 'Authorization: Bearer KEY'")

    def of(self, request: Request) -> Caller:
        """``who`` for an HTTP request."""
        return self.who(request.headers.get("authorization"),
                        request.client.host if request.client else None)
