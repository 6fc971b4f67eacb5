"""Real llama-server processes on loopback, for tests and benchmarks.

    with llama_server(model, parallel=2) as server:
        ...server.url...     # http://127.0.0.1:PORT, answering /health
        server.kill()        # SIGKILL, as a crash would
        server.start()       # again, on the same port

    certs = make_certs(tmp_path)                 # a test CA and a certificate for 127.0.0.1
    with llama_server(model, certs=certs, api_key="k") as server:
        ...server.url...     # https://127.0.0.1:PORT, its certificate signed by certs.ca

The binary is $LLAMA_SERVER or build/llama-server/build/bin/llama-server (built by
tools/build-llama-server.sh). ``binary_or_skip`` skips a test without one, and fails it
instead when CI=true, so that CI cannot pass by skipping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILT = REPO / "build/llama-server/build/bin/llama-server"


def find_binary() -> Path | None:
    """The llama-server binary to use, or None when there is none."""
    path = Path(os.environ.get("LLAMA_SERVER") or BUILT)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def binary_or_skip() -> Path:
    import pytest

    binary = find_binary()
    if binary is not None:
        return binary
    reason = (f"no llama-server binary at {os.environ.get('LLAMA_SERVER') or BUILT}: "
              "build one with `bash tools/build-llama-server.sh` or set $LLAMA_SERVER")
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    """A loopback port that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Certs:
    """A test CA (``ca``, PEM) and a certificate it signed for 127.0.0.1, with its key."""

    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path, name: str = "test") -> Certs:
    """A new CA and a server certificate for IP 127.0.0.1, made by the openssl CLI in
    ``directory`` (files NAME-ca.pem, NAME-server.pem, NAME-server.key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *curve, "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.pem",
            "-subj", f"/CN=axfs {name} CA", "-days", "2",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    openssl("req", *curve, "-keyout", f"{name}-server.key", "-out", f"{name}-server.csr",
            "-subj", "/CN=127.0.0.1")
    (directory / f"{name}-ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", f"{name}-server.csr", "-CA", f"{name}-ca.pem", "-CAkey",
            f"{name}-ca.key", "-CAcreateserial", "-out", f"{name}-server.pem", "-days", "2",
            "-extfile", f"{name}-ext")
    return Certs(directory / f"{name}-ca.pem", directory / f"{name}-server.pem",
                 directory / f"{name}-server.key")


class Server:
    """One llama-server process; ``start`` and ``kill`` may be called again and again.
    With ``certs`` it serves https with certs.cert; with ``api_key`` it wants that key."""

    def __init__(self, binary: Path, model: Path, parallel: int, ctx: int, threads: int,
                 extra: tuple[str, ...] = (), certs: Certs | None = None, api_key: str = "") -> None:
        self.port = free_port()
        self.url = f"{'https' if certs else 'http'}://127.0.0.1:{self.port}"
        self._tls = ssl.create_default_context(cafile=certs.ca) if certs else None
        if certs:
            extra += ("--ssl-key-file", str(certs.key), "--ssl-cert-file", str(certs.cert))
        if api_key:
            extra += ("--api-key", api_key)
        self.argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                     "--parallel", str(parallel), "-c", str(ctx), "-t", str(threads),
                     "-tb", str(threads), "--no-webui", *extra]
        self.log = Path(tempfile.mkstemp(prefix=f"llama-server-{self.port}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server is not running")
        return self.proc.pid

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until /health answers 200."""
        self.stop()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"llama-server did not start: {' '.join(self.argv)}\n{tail}")
            time.sleep(0.05)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2, context=self._tls) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would: no goodbye to its clients."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.stop()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def llama_server(model: Path, parallel: int = 2, ctx: int = 4096, threads: int = 1,
                 binary: Path | None = None, extra: tuple[str, ...] = (), certs: Certs | None = None,
                 api_key: str = "") -> Iterator[Server]:
    """A started llama-server on a free loopback port, stopped (and its log removed) after."""
    binary = binary or find_binary()
    if binary is None:
        raise RuntimeError(f"no llama-server binary (set $LLAMA_SERVER or build {BUILT})")
    server = Server(binary, model, parallel, ctx, threads, extra, certs, api_key)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server.log.unlink(missing_ok=True)
