"""What tools/bench/throughput measures axfs against, and the rounds every side reports.

The baselines: llama-cpp-python's high-level ``Llama``, one prompt after another in this
process (``baseline``); llama.cpp's own server with N slots, sent N requests at once over
HTTP (``llama_server``, ``server_round``); and axfs's own driver stepping the N sequences
in this process with no kernel and no files (``Raw``). The script imports this module from
its own folder (it is run as ``python tools/bench/throughput``), so that a checkout's
script always uses the same checkout's baselines.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import shlex
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from unittest import mock

PROMPTS = [
    "The history of the Roman Empire began", "The best way to learn a new language is",
    "Water boils at a lower temperature on mountains because",
    "Photosynthesis is the process by which plants", "In the summer of 1969, three astronauts",
    "A good cup of coffee starts with", "The main causes of the French Revolution were",
    "To bake bread at home, you will need", "The ocean covers most of the Earth, and",
    "Computers store information using", "The city of Paris is famous for",
    "When the train finally arrived at the station,", "The rules of chess are simple:",
    "Elephants are the largest land animals, and they",
    "Once upon a time, in a small village by the sea,",
    "Electric cars differ from petrol cars in that",
]


@dataclass
class Request:
    prompt: int  # index into PROMPTS
    ttft_ms: float
    tokens: int
    stages_ms: dict[str, float] = field(default_factory=dict)  # axfs: where the TTFT went


@dataclass
class Round:
    wall_s: float
    requests: list[Request]
    others_cpu: float  # share of the machine's CPU that other processes used meanwhile
    cpu_ms: dict[str, float] = field(default_factory=dict)  # whose CPU time the round took


def cpu_meter(daemon: int | None = None) -> Callable[[], dict[str, float]]:
    """Meters the CPU time (ms) this process and its waited-for children (the ``cat``s)
    take from now on, and with ``daemon`` that process's: its main thread (the trio
    thread: FUSE requests, the kernel) apart from all its others (the step thread and
    llama.cpp's, with any short-lived helper)."""
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")

    def ticks(path: str) -> int:
        return sum(int(x) for x in Path(path).read_text().rsplit(")", 1)[1].split()[11:13])

    def now() -> dict[str, float]:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {"client": 1000 * (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime)}
        if daemon is not None:
            main = ticks(f"/proc/{daemon}/task/{daemon}/stat") * tick_ms
            out["trio thread"] = main
            out["model threads"] = ticks(f"/proc/{daemon}/stat") * tick_ms - main
        return out

    start = now()
    return lambda: {k: v - start[k] for k, v in now().items()}


def others_meter(*pids: int) -> Callable[[], float]:
    """Meters the CPU share that processes other than ours (this one, ``pids``) use now on."""
    def ticks() -> tuple[int, int]:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split()[1:9]]  # user..steal
        ours = sum(int(x) for p in (os.getpid(), *pids)  # utime stime cutime cstime
                   for x in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[11:15])
        return sum(cpu), sum(cpu) - cpu[3] - cpu[4] - ours

    start = ticks()

    def share() -> float:
        total, busy = ticks()
        return (busy - start[1]) / max(1, total - start[0])

    return share


def prompts_for(n: int) -> list[int]:
    return [i % len(PROMPTS) for i in range(n)]


# -- the baseline: llama-cpp-python's Llama, one prompt after another ----------------------

def load_llama(model: Path, max_tokens: int, repack: bool, ngl: int) -> Any:
    """``Llama`` on every core with ``ngl`` layers on the GPU, its weights repacked or not
    as axfs's driver loads them (``use_extra_bufts``, set by way of the default model
    params)."""
    import llama_cpp
    from llama_cpp import llama_cpp as lc

    def params() -> Any:
        p = default()
        p.use_extra_bufts = repack
        return p

    default, threads = lc.llama_model_default_params, os.cpu_count() or 1
    with mock.patch.object(lc, "llama_model_default_params", params):
        return llama_cpp.Llama(str(model), n_ctx=1024 + max_tokens, n_threads=threads,
                               n_threads_batch=threads, n_gpu_layers=ngl, verbose=False)


def sequential(llm: Any, p: int, max_tokens: int) -> Request:
    """One prompt through ``Llama``, streamed; TTFT is the wait for the first chunk."""
    llm.reset()  # no prefix reuse across calls: axfs has no prefix cache either
    n_prompt = len(llm.tokenize(PROMPTS[p].encode()))
    start = time.time()
    first = 0.0
    chunks = llm.create_completion(PROMPTS[p], max_tokens=max_tokens, temperature=0.0,
                                   top_k=1, stream=True)
    for _ in cast(Iterator[dict[str, Any]], chunks):
        first = first or time.time()
    # The last token sampled is never evaluated, whether it ended the text or hit
    # max_tokens, so the tokens sampled are those evaluated past the prompt, plus one.
    return Request(p, (first - start) * 1000, llm.n_tokens - n_prompt + 1)


def baseline(model: Path, ns: list[int], max_tokens: int, repeat: int,
             repack: bool, ngl: int) -> dict[int, list[Round]]:
    llm = load_llama(model, max_tokens, repack, ngl)
    sequential(llm, 0, max_tokens)  # warm-up
    results: dict[int, list[Round]] = {}
    for n in ns:
        for _ in range(repeat):
            start, others, cpu = time.time(), others_meter(), cpu_meter()
            requests = [sequential(llm, p, max_tokens) for p in prompts_for(n)]
            results.setdefault(n, []).append(Round(time.time() - start, requests, others(),
                                                      {"model": cpu()["client"]}))
    del llm  # free the model and its context before axfs loads its own
    gc.collect()
    return results


# -- the other baseline: llama.cpp's llama-server, N requests at once over HTTP ------------

@contextlib.contextmanager
def llama_server(binary: str, model: Path, parallel: int, ctx: int, repack: bool, ngl: int,
                 env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """llama-server on a free loopback port with ``parallel`` slots and ``ngl`` layers on
    the GPU, in ``env`` (None: this process's); yields its URL, pid."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = str(os.cpu_count() or 1)
    argv = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx),
            "-np", str(parallel), "-t", threads, "-tb", threads, "-ngl", str(ngl), "--no-webui"]
    if not repack:
        argv.append("--no-repack")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server did not start: {shlex.join(argv)}") from None
                time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def server_request(url: str, p: int, max_tokens: int) -> Request:
    body = json.dumps({"prompt": PROMPTS[p], "n_predict": max_tokens, "temperature": 0,
                       "top_k": 1, "stream": True, "cache_prompt": False}).encode()
    req = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
    start, first, tokens = time.time(), 0.0, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            first = first or time.time()
            if chunk.get("stop"):
                tokens = int(chunk.get("tokens_predicted", 0))
    return Request(p, (first - start) * 1000, tokens)


def server_round(url: str, pid: int, n: int, max_tokens: int) -> Round:
    start, others = time.time(), others_meter(pid)
    with ThreadPoolExecutor(n) as pool:
        requests = list(pool.map(lambda p: server_request(url, p, max_tokens), prompts_for(n)))
    return Round(time.time() - start, requests, others())


# -- the other baseline: the driver alone, no kernel and no FUSE ----------------------------

class Raw:
    """The model's own rate: the same N prompts stepped through axfs's llama.cpp driver in
    this process, greedy, with continuous batching as simple as it gets (every sequence's
    prompt, then one token each a step until EOG or ``max_tokens``); no scheduler, no
    journal, no files."""

    def __init__(self, model: Path, repack: bool, ctx: int, slots: int, gpu_layers: int,
                 deterministic: bool) -> None:
        from drivers.llamacpp import LlamaCppDriver

        self.driver = LlamaCppDriver(model, n_ctx=ctx, n_seq_max=slots, repack=repack,
                                     gpu_layers=gpu_layers, deterministic=deterministic)

    def round(self, prompts: list[int], max_tokens: int) -> Round:
        from drivers.base import Piece, Sampling

        d = self.driver
        start, others, cpu = time.time(), others_meter(), cpu_meter()
        tokens = [d.tokenize(PROMPTS[p]) for p in prompts]
        for seq in range(len(prompts)):
            d.open_seq(seq, Sampling())
        firsts = [0.0] * len(prompts)
        counts = [0] * len(prompts)
        last: dict[int, int] = {}  # seq -> its token to feed next
        pos = [0] * len(prompts)
        todo = list(range(len(prompts)))  # prompts not yet fed, in chunks of n_batch
        while todo or last:
            pieces = [Piece(seq, [tok], pos[seq], True) for seq, tok in last.items()]
            budget = d.shape.n_batch - len(pieces)
            while todo and len(tokens[todo[0]]) <= budget:
                seq = todo.pop(0)
                pieces.append(Piece(seq, tokens[seq], 0, True))
                budget -= len(tokens[seq])
            sampled = d.step(pieces)
            now = time.time()
            for piece in pieces:
                seq, tok = piece.seq, sampled[piece.seq]
                pos[seq] = piece.pos + len(piece.tokens)
                firsts[seq] = firsts[seq] or now
                counts[seq] += 1
                if d.is_eog(tok) or counts[seq] >= max_tokens:
                    last.pop(seq, None)
                else:
                    last[seq] = tok
        for seq in range(len(prompts)):
            d.close_seq(seq)
        requests = [Request(p, (firsts[i] - start) * 1000, counts[i]) for i, p in enumerate(prompts)]
        return Round(time.time() - start, requests, others(), {"model": cpu()["client"]})
