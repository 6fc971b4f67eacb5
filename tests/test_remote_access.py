"""Remote endpoints deployed as people deploy them: llama-server serving https with a
certificate from a test CA (its own --ssl-key-file/--ssl-cert-file), and wanting an API
key (--api-key). Through drivers.pool, then through the mounted tree: a wrong CA or a
wrong key fails at once with the reason and shows in models/NAME/info, the right ones
work, and the key is in no file of the tree, its trace, or the state directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from drivers.credentials import Access, read_key, tls_context
from drivers.openai import RemoteError
from drivers.pool import Pool
from drivers.request import Request
from tests.conftest import mount, mounted
from tests.servers import Certs, Server, binary_or_skip, llama_server, make_certs
from tests.test_remote_driver import read_request

KEY = "sk-axfs-test-4f1c9e0b7d2a"
PROMPT = "Hello world"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Certs, Certs]:
    """The server's CA, and another CA that signed nothing the server shows."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no openssl CLI to make the test CA")
        pytest.skip("no openssl CLI to make the test CA")
    directory = tmp_path_factory.mktemp("tls")
    return make_certs(directory, "right"), make_certs(directory, "wrong")


@pytest.fixture(scope="module")
def server(tiny_model: Path, certs: tuple[Certs, Certs]) -> Iterator[Server]:
    """One llama-server on https, wanting KEY."""
    with llama_server(tiny_model, parallel=2, ctx=4096, binary=binary_or_skip(), certs=certs[0],
                      api_key=KEY) as s:
        yield s


def key_file(path: Path, key: str = KEY, mode: int = 0o600) -> Path:
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


# -- the pool ---------------------------------------------------------------------------------

async def test_right_ca_and_key_stream(server: Server, certs: tuple[Certs, Certs]) -> None:
    async with Pool([server.url], access=Access(tls_context(str(certs[0].ca)), KEY)) as pool:
        parts: list[str] = []
        outcome = await pool.complete(Request(PROMPT, 16), parts.append)
        assert outcome.tokens == 16 and "".join(parts)
        assert [(s.state, s.served) for s in pool.status()] == [("up", 1)]


@pytest.mark.parametrize("ca", ["wrong", "system"])
async def test_untrusted_certificate_fails_at_once(server: Server, certs: tuple[Certs, Certs],
                                                   ca: str) -> None:
    tls = tls_context(str(certs[1].ca)) if ca == "wrong" else tls_context()
    async with Pool([server.url], access=Access(tls, KEY), give_up_s=60) as pool:
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"untrusted: certificate verify failed: "
                                              r"(unable to get local issuer|self.signed)"):
            await pool.complete(Request(PROMPT, 8), lambda text: None)
        assert time.monotonic() - start < 5  # not retried until give_up_s
        [status] = pool.status()
        assert (status.state, status.failures, status.up) == ("untrusted", 1, False)


async def test_wrong_key_is_denied_at_once(server: Server, certs: tuple[Certs, Certs]) -> None:
    tls = tls_context(str(certs[0].ca))
    for key in ["sk-wrong", ""]:
        async with Pool([server.url], access=Access(tls, key), give_up_s=60) as pool:
            start = time.monotonic()
            with pytest.raises(RemoteError, match=r"denied: HTTP 401: Invalid API Key"):
                await pool.complete(Request(PROMPT, 8), lambda text: None)
            assert time.monotonic() - start < 5
            assert [(s.state, s.failures) for s in pool.status()] == [("denied", 1)]


async def test_denied_endpoint_moves_to_one_that_takes_the_key(
        server: Server, tiny_model: Path, certs: tuple[Certs, Certs]) -> None:
    with llama_server(tiny_model, parallel=1, ctx=2048, binary=binary_or_skip(), certs=certs[0],
                      api_key="another-key") as other:
        access = Access(tls_context(str(certs[0].ca)), KEY)
        async with Pool([other.url, server.url], access=access) as pool:
            outcome = await pool.complete(Request(PROMPT, 8), lambda text: None)
            assert (outcome.endpoint, outcome.moves, outcome.tokens) == (server.url, 1, 8)
            assert [s.state for s in pool.status()] == ["denied", "up"]


async def test_a_key_the_server_echoes_is_not_shown() -> None:
    """A server that puts the Authorization header in its 401 answer: the key is not in
    the error, nor in the pool's status."""
    body = f'{{"error":{{"message":"bad header Bearer {KEY}"}}}}'.encode()
    answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(answer)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with Pool([url], access=Access(tls_context(), KEY)) as pool:
            with pytest.raises(RemoteError) as e:
                await pool.complete(Request(PROMPT, 8), lambda text: None)
            assert KEY not in str(e.value) and "Bearer [key]" in str(e.value)
            assert KEY not in pool.status()[0].last_error
        nursery.cancel_scope.cancel()


def test_key_and_ca_files_are_checked(tmp_path: Path) -> None:
    assert read_key(str(key_file(tmp_path / "ok"))) == KEY
    with pytest.raises(ValueError, match=r"mode 0640: its group and others may read it; .*chmod 600"):
        read_key(str(key_file(tmp_path / "open", mode=0o640)))
    theirs = key_file(tmp_path / "theirs")
    os.chown(theirs, 65534, -1)
    if os.geteuid() == 0:  # only root can give a file away
        with pytest.raises(ValueError, match="belongs to uid 65534"):
            read_key(str(theirs))
    for content in ["", "two words"]:
        with pytest.raises(ValueError, match="does not hold a key") as e:
            read_key(str(key_file(tmp_path / "bad", key=content)))
        assert content not in str(e.value) or not content
    with pytest.raises(ValueError, match="not a regular file"):
        read_key(str(tmp_path))
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        tls_context(str(key_file(tmp_path / "not-pem")))


# -- through the mount ------------------------------------------------------------------------

def test_https_and_key_through_the_mount(server: Server, certs: tuple[Certs, Certs], tiny_model: Path,
                                         tmp_path: Path) -> None:
    key = key_file(tmp_path / "far.key")
    wrong = key_file(tmp_path / "wrong.key", key="sk-not-it")
    ca, other_ca = certs[0].ca, certs[1].ca
    with mounted(tmp_path, tiny_model, "--remote", f"far={server.url},key={key},ca={ca}") as ax:
        info = ax.read("models/far/info")
        assert f"key_file {key}" in info and f"ca_file {ca}" in info
        ax.sh("mkdir tasks/ok && printf 'model far\\nmax_tokens 8\\n' > tasks/ok/config"
              " && echo hello > tasks/ok/prompt && cat tasks/ok/stream > /dev/null", timeout=60)
        assert ax.status("ok")["state"] == "done"
        assert f"endpoint {server.url} up" in ax.read("models/far/info")
        # A wrong key: the task fails with the server's words; info says denied and 401.
        ax.sh(f"echo 'endpoints {server.url} key={wrong} ca={ca}' > models/far/ctl")
        ax.sh("mkdir tasks/nokey && printf 'model far\\nmax_tokens 8\\n' > tasks/nokey/config"
              " && echo hello > tasks/nokey/prompt && cat tasks/nokey/stream > /dev/null", timeout=30)
        assert ax.status("nokey")["state"] == "failed"
        assert "denied: HTTP 401: Invalid API Key" in ax.read("tasks/nokey/error")
        assert f"endpoint {server.url} denied" in (info := ax.read("models/far/info"))
        assert "error=HTTP 401: Invalid API Key" in info, info
        # A CA that did not sign the server's certificate: untrusted, with the reason.
        ax.sh(f"echo 'endpoints {server.url} key={key} ca={other_ca}' > models/far/ctl")
        ax.sh("mkdir tasks/noca && printf 'model far\\nmax_tokens 8\\n' > tasks/noca/config"
              " && echo hello > tasks/noca/prompt && cat tasks/noca/stream > /dev/null", timeout=30)
        assert ax.status("noca")["state"] == "failed"
        assert "untrusted: certificate verify failed" in ax.read("tasks/noca/error")
        assert f"endpoint {server.url} untrusted" in ax.read("models/far/info")
        # A key file others may read is refused with the reason (in the trace).
        key.chmod(0o644)
        done = ax.sh(f"echo 'endpoints {server.url} key={key} ca={ca}' > models/far/ctl", check=False)
        assert done.returncode != 0 and "Invalid argument" in done.stderr
        assert f"key file {key} is mode 0644" in ax.read("trace")
        # The key is in no file of the tree, nor in the state directory (journal, log, models.json).
        found = subprocess.run(["grep", "-r", "-l", "-F", KEY, str(ax.path), str(ax.state)],
                               capture_output=True, text=True, timeout=60)
        assert found.returncode == 1 and not found.stdout, found.stdout
        assert KEY not in ax.read("trace")
    # At mount: a key file others may read is refused, with the reason.
    done = mount(tmp_path / "mnt2", tiny_model, tmp_path / "state2",
                 "--remote", f"far={server.url},key={key}")
    assert done.returncode != 0 and f"key file {key} is mode 0644" in done.stderr, done.stderr
