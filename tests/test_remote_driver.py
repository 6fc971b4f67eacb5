"""drivers.openai against real llama-server processes on loopback: streaming, load
spreading, failover on SIGKILL, retry after restart, refusals, giving up, cancellation.

A few failures a real server cannot be made to show on demand (a server that accepts and
never answers, a 5xx, a body delimited by the connection's close) are played from a
loopback socket that sends fixed bytes.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from drivers.openai import RemoteError, parse_url
from drivers.pool import Outcome, Pool
from drivers.request import Request
from tests.servers import Server, binary_or_skip, free_port, llama_server

PROMPT = "Hello world"
Events = list[tuple[str, dict[str, str]]]


@pytest.fixture(scope="module")
def binary() -> Path:
    return binary_or_skip()


@pytest.fixture
def two(tiny_model: Path, binary: Path) -> Iterator[tuple[Server, Server]]:
    """Two llama-servers with two slots of 4096 cells each."""
    with llama_server(tiny_model, parallel=2, ctx=8192, binary=binary) as a, \
            llama_server(tiny_model, parallel=2, ctx=8192, binary=binary) as b:
        yield a, b


def recorder() -> tuple[Events, Callable[[str, dict[str, str]], None]]:
    events: Events = []
    return events, lambda kind, fields: events.append((kind, fields))


def post(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url + "/v1/completions", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        answer: dict[str, Any] = json.load(r)
        return answer


def slots_busy(url: str) -> int:
    with urllib.request.urlopen(url + "/slots", timeout=5) as r:
        return sum(1 for slot in json.load(r) if slot["is_processing"])


def test_urls_are_validated() -> None:
    assert parse_url("http://127.0.0.1:8080/v1/").url == "http://127.0.0.1:8080"
    assert parse_url("http://localhost/").url == "http://localhost:80"
    assert parse_url("http://[::1]:9000").url == "http://[::1]:9000"
    assert parse_url("https://api.example.com/v1").url == "https://api.example.com:443"
    for bad, words in [("ftp://h:1", "only http and https"), ("127.0.0.1:8080", "only http and https"),
                       ("https://user:secret@h", "a key goes in a key file"),
                       ("http://:8080", "no host"), ("http://h:1/api", "no path other than /v1"),
                       ("http://h:1/v1?x=1", "no user, query"), ("http://h:99999", "out of range")]:
        with pytest.raises(ValueError, match=words):
            parse_url(bad)
    with pytest.raises(ValueError, match="listed twice"):
        Pool(["http://h:1", "http://h:1/v1"])
    with pytest.raises(ValueError, match="at least one"):
        Pool([])
    with pytest.raises(ValueError, match="max_tokens"):
        Request("x", 0)


async def test_stream_matches_non_streaming(tiny_model: Path, binary: Path) -> None:
    with llama_server(tiny_model, parallel=1, ctx=4096, binary=binary) as server:
        pool = Pool([server.url + "/v1"])
        for req in [Request(PROMPT, 64), Request(PROMPT, 64, stop=(" year",))]:
            parts: list[str] = []
            outcome = await pool.complete(req, parts.append)
            whole = await trio.to_thread.run_sync(post, server.url, {
                "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
                "stop": list(req.stop)})
            choice = whole["choices"][0]
            assert "".join(parts) == choice["text"]
            assert outcome == Outcome(choice["finish_reason"], whole["usage"]["completion_tokens"],
                                      server.url, 0)
        assert outcome.finish_reason == "stop" and outcome.tokens < 64
        assert [(s.served, s.inflight, s.up) for s in pool.status()] == [(2, 0, True)]


async def test_concurrent_requests_use_both(two: tuple[Server, Server]) -> None:
    a, b = two
    pool = Pool([a.url, b.url])
    most = [0, 0]

    def on_text(text: str) -> None:
        for i, s in enumerate(pool.status()):
            most[i] = max(most[i], s.inflight)

    outcomes: list[Outcome] = []

    async def one(i: int) -> None:
        outcomes.append(await pool.complete(Request(f"{PROMPT} {i}", 200), on_text))

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, i)
    assert most == [2, 2]
    assert [(s.served, s.inflight) for s in pool.status()] == [(2, 0), (2, 0)]
    assert sorted(o.endpoint for o in outcomes) == sorted([a.url, a.url, b.url, b.url])
    assert all(o.tokens == 200 and o.moves == 0 for o in outcomes)


async def test_slots_are_the_servers_unless_set_and_no_more_requests_go_at_once(
        two: tuple[Server, Server]) -> None:
    a, b = two
    pool = Pool([a.url, b.url], slots=[1, 0])
    assert [(s.slots, s.slots_from) for s in pool.status()] == [(1, "set"), (4, "default")]
    await pool.probe()  # llama-server's /props: total_slots 2 (--parallel 2)
    assert [(s.slots, s.slots_from) for s in pool.status()] == [(1, "set"), (2, "server")]
    assert pool.capacity() == 3 and pool.room() == 3
    most = [0, 0]

    def on_text(text: str) -> None:
        for i, s in enumerate(pool.status()):
            most[i] = max(most[i], s.inflight)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(pool.complete, Request(f"{PROMPT} {i}", 100), on_text)
    assert most == [1, 2] and pool.room() == 3


async def test_sigkill_mid_stream_moves_to_the_other(two: tuple[Server, Server]) -> None:
    a, b = two
    events, on_event = recorder()
    pool = Pool([a.url, b.url], on_event=on_event)
    killed: list[Server] = []
    parts: list[str] = []

    def on_text(text: str) -> None:
        parts.append(text)
        if len(parts) == 5:
            serving = a if pool.status()[0].inflight else b
            serving.kill()
            killed.append(serving)

    outcome = await pool.complete(Request(PROMPT, 1000), on_text)
    dead, alive = killed[0], (b if killed[0] is a else a)
    assert outcome == Outcome("length", 1000, alive.url, 1)
    assert [kind for kind, _ in events] == ["endpoint_down", "move"]
    assert events[0][1]["url"] == dead.url and "broke off" in events[0][1]["reason"]
    moved = events[1][1]
    assert (moved["from"], moved["to"]) == (dead.url, alive.url) and int(moved["tokens"]) >= 5
    status = {s.url: s for s in pool.status()}
    assert not status[dead.url].up and status[dead.url].failures == 1
    assert 25 < status[dead.url].retry_in_s <= 30
    assert status[alive.url].served == 1 and all(s.inflight == 0 for s in status.values())


async def test_down_endpoint_is_used_again_after_retry(two: tuple[Server, Server]) -> None:
    a, b = two
    events, on_event = recorder()
    pool = Pool([a.url, b.url], retry_s=0.5, on_event=on_event)
    a.kill()
    first = await pool.complete(Request(PROMPT, 8), lambda text: None)
    assert (first.endpoint, first.moves) == (b.url, 1)  # a, first in turn, refused
    assert "Connection refused" in pool.status()[0].last_error
    second = await pool.complete(Request(PROMPT, 8), lambda text: None)
    assert (second.endpoint, second.moves) == (b.url, 0)  # a is down for 0.5 s
    await trio.to_thread.run_sync(a.start)
    await trio.sleep(0.5)
    ends = {(await pool.complete(Request(PROMPT, 8), lambda text: None)).endpoint for _ in range(2)}
    assert ends == {a.url, b.url}
    assert [kind for kind, _ in events] == ["endpoint_down", "move", "endpoint_up"]
    assert [(s.up, s.served) for s in pool.status()] == [(True, 1), (True, 3)]


async def test_waits_for_an_endpoint_to_come_back(tiny_model: Path, binary: Path) -> None:
    server = Server(binary, tiny_model, parallel=1, ctx=2048, threads=1)
    events, on_event = recorder()
    pool = Pool([server.url], retry_s=0.3, give_up_s=30, on_event=on_event)
    async def start() -> None:
        await trio.to_thread.run_sync(server.start)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            outcome = await pool.complete(Request(PROMPT, 8), lambda text: None)
    finally:
        server.stop()
        server.log.unlink(missing_ok=True)
    assert outcome.endpoint == server.url and outcome.moves >= 1 and outcome.tokens == 8
    assert events[0][0] == "endpoint_down" and events[-1] == ("endpoint_up", {"url": server.url})


async def test_4xx_is_the_requests_fault(tiny_model: Path, binary: Path) -> None:
    with llama_server(tiny_model, parallel=1, ctx=512, binary=binary) as server:
        events, on_event = recorder()
        pool = Pool([server.url], on_event=on_event)
        with pytest.raises(RemoteError, match=r"HTTP 400.*exceeds the available context size"):
            await pool.complete(Request("word " * 2000, 8), lambda text: None)
        assert events == []
        assert [(s.up, s.failures, s.inflight) for s in pool.status()] == [(True, 0, 0)]


async def test_all_down_gives_up() -> None:
    urls = [f"http://127.0.0.1:{free_port()}", f"http://localhost:{free_port()}"]
    pool = Pool(urls, retry_s=0.2, give_up_s=1.0)
    start = time.monotonic()
    with pytest.raises(RemoteError) as e:
        await pool.complete(Request(PROMPT, 8), lambda text: None)
    assert 1.0 <= time.monotonic() - start < 3
    assert str(e.value) == (f"no endpoint answers: {urls[0]}: cannot connect: Connection refused; "
                            f"{urls[1]}: cannot connect: Connection refused")
    assert all(s.failures >= 3 and not s.up and s.inflight == 0 for s in pool.status())


async def test_all_down_for_longer_than_give_up() -> None:
    pool = Pool([f"http://127.0.0.1:{free_port()}"], retry_s=60, give_up_s=0.3)
    with pytest.raises(RemoteError, match="Connection refused"):
        await pool.complete(Request(PROMPT, 8), lambda text: None)
    start = time.monotonic()  # a new request finds the endpoint down for a minute
    with pytest.raises(RemoteError, match="Connection refused"):
        await pool.complete(Request(PROMPT, 8), lambda text: None)
    assert 0.3 <= time.monotonic() - start < 1 and pool.status()[0].failures == 1


async def test_cancel_closes_the_connection(tiny_model: Path, binary: Path) -> None:
    with llama_server(tiny_model, parallel=1, ctx=8192, binary=binary) as server:
        pool = Pool([server.url])
        with trio.CancelScope() as scope:
            await pool.complete(Request(PROMPT, 4000), lambda text: scope.cancel())
        assert scope.cancelled_caught
        assert pool.status()[0].inflight == 0
        deadline = time.monotonic() + 2
        while await trio.to_thread.run_sync(slots_busy, server.url):
            assert time.monotonic() < deadline, "llama-server still generates"
            await trio.sleep(0.05)


# -- failures played from fixed bytes --------------------------------------------------------

SSE = b"".join(b'data: {"choices":[{"text":"%s","finish_reason":%s}]}\n\n' % (t, f)
               for t, f in [(b"one", b"null"), (b" two", b"null"), (b" three", b'"stop"')])


async def read_request(stream: trio.SocketStream) -> None:
    """The whole request: a close with part of it unread would be a reset, not a close
    (httpx writes the head and the body apart)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += await stream.receive_some(65536)


async def scripted(nursery: trio.Nursery, answer: bytes | None) -> str:
    """A loopback url whose every connection reads the request and gets ``answer`` and a
    close, or (None) nothing at all."""
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        if answer is None:
            await trio.sleep_forever()
        await stream.send_all(answer)
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def with_scripted(*answers: bytes | None,
                        body: Callable[[list[str]], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        await body([await scripted(nursery, answer) for answer in answers])
        nursery.cancel_scope.cancel()


async def test_timeout_and_5xx_move_on(tiny_model: Path, binary: Path) -> None:
    busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 49\r\n\r\n" \
           b'{"error":{"code":503,"message":"Loading model"}}\n'

    async def body(urls: list[str]) -> None:
        with llama_server(tiny_model, parallel=1, ctx=2048, binary=binary) as server:
            events, on_event = recorder()
            pool = Pool([*urls, server.url], timeout_s=0.5, on_event=on_event)
            outcome = await pool.complete(Request(PROMPT, 8), lambda text: None)
            assert outcome == Outcome("length", 8, server.url, 2)
            silent, unavailable, _ = pool.status()
            assert silent.last_error == "no answer for 0.5 s"
            assert unavailable.last_error == "HTTP 503: Loading model"
            assert [e for e in events if e[0] == "move"][-1][1]["to"] == server.url

    await with_scripted(None, busy, body=body)


async def test_close_delimited_and_content_length_bodies() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    answers = [head + b"Connection: close\r\n\r\n" + SSE,
               head + b"Content-Length: %d\r\n\r\n" % len(SSE) + SSE,
               head + b"Connection: close\r\n\r\n" + SSE[:SSE.index(b"data", 10)]]

    async def body(urls: list[str]) -> None:
        for url in urls[:2]:
            parts: list[str] = []
            outcome = await Pool([url]).complete(Request(PROMPT, 8), parts.append)
            assert (parts, outcome) == (["one", " two", " three"], Outcome("stop", 3, url, 0))
        pool = Pool(urls[2:], give_up_s=0)
        with pytest.raises(RemoteError, match="ended after 1 tokens, before it finished"):
            await pool.complete(Request(PROMPT, 8), lambda text: None)

    await with_scripted(*answers, body=body)


async def test_cancel_while_waiting_frees_inflight() -> None:
    async def body(urls: list[str]) -> None:
        pool = Pool(urls, timeout_s=30)
        with trio.move_on_after(0.3):
            await pool.complete(Request(PROMPT, 8), lambda text: None)
        assert pool.status()[0].inflight == 0 and pool.status()[0].up

    await with_scripted(None, body=body)
