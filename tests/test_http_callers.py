"""Who is asking (axfs/http/callers.py) and the --http options (axfs/http/server.py), alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from axfs.errors import BadInput
from axfs.http.callers import Callers, Unauthorized, read_keys
from axfs.http.server import load_callers, parse_options

KEY_A = "a" * 20
KEY_B = "b-key-with-32-characters-of-text"


def keys_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "keys"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_keys_map_to_uids(tmp_path: Path) -> None:
    path = keys_file(tmp_path, f"# who may ask\n\n{KEY_A} 1001\n{KEY_B} root\n")
    callers = Callers(read_keys(str(path)), owner=4242)
    assert callers.who(f"Bearer {KEY_A}", "10.0.0.1").uid == 1001
    assert callers.who(f"bearer  {KEY_B} ", "127.0.0.1").uid == 0
    with pytest.raises(Unauthorized, match="not one this server knows"):
        callers.who("Bearer wrong-key-wrong-key", "127.0.0.1")
    with pytest.raises(Unauthorized, match="an API key is needed"):
        callers.who(None, "127.0.0.1")


def test_open_loopback_serves_loopback_clients_as_the_owner(tmp_path: Path) -> None:
    path = keys_file(tmp_path, f"{KEY_A} 1001\n")
    callers = Callers(read_keys(str(path)), open_loopback=True, owner=4242)
    assert callers.who(None, "127.0.0.1").uid == 4242
    assert callers.who("Bearer placeholder-of-a-client", "::1").uid == 4242
    assert callers.who(f"Bearer {KEY_A}", "::1").uid == 1001
    with pytest.raises(Unauthorized):
        callers.who(None, "192.0.2.7")
    assert Callers(None, owner=4242).who(None, "192.0.2.7").uid == 4242  # no keys: the owner's


@pytest.mark.parametrize(("text", "mode", "words"), [
    (f"{KEY_A} 1001\n", 0o640, "mode 0640: its group and others may read it"),
    (f"{KEY_A}\n", 0o600, "line 1: expected KEY UID"),
    ("short 1001\n", 0o600, "line 1: a key is at least 16"),
    (f"{KEY_A} nosuchuser-here\n", 0o600, "line 1: no user 'nosuchuser-here'"),
    (f"{KEY_A} 1\n{KEY_A} 2\n", 0o600, "line 2: the same key as an earlier line"),
    ("# nothing\n", 0o600, "has no key"),
])
def test_a_bad_keys_file_is_refused_with_the_reason(tmp_path: Path, text: str, mode: int,
                                                   words: str) -> None:
    path = keys_file(tmp_path, text, mode)
    with pytest.raises(BadInput, match=words) as refused:
        load_callers(parse_options("8000", str(path)))
    assert KEY_A not in str(refused.value)


def test_a_keys_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    path = keys_file(tmp_path, f"{KEY_A} 1\n")
    os.chown(path, 1234, -1)
    with pytest.raises(BadInput, match="belongs to uid 1234"):
        load_callers(parse_options("8000", str(path)))


def test_http_options() -> None:
    assert parse_options("8000").bind == "127.0.0.1:8000"
    assert parse_options("[::1]:8000").bind == "[::1]:8000"
    assert parse_options("0.0.0.0:80", "/k").bind == "0.0.0.0:80"
    with pytest.raises(BadInput, match="not a loopback address: give --http-keys"):
        parse_options("0.0.0.0:8000")
    with pytest.raises(BadInput, match="expected \\[HOST:\\]PORT"):
        parse_options("localhost:http")
    with pytest.raises(BadInput, match="HOST must be an IP address"):
        parse_options("example.org:80", "/k")
    with pytest.raises(BadInput, match="is for a server with --http-keys"):
        parse_options("8000", open_loopback=True)
    for keys, open_loopback in (("", False), ("/k", True)):
        with pytest.raises(BadInput, match="a --multi-user tree needs --http-keys"):
            parse_options("8000", keys, open_loopback, multi_user=True)
    assert parse_options("8000", "/k", multi_user=True).keys_file == "/k"
