"""One remote request as drivers.openai sends it: what it asks (``Request``), what it has
received so far across endpoints and attempts (``Progress``), and one attempt's
reading of its stream (``Attempt``).

A request is a completion of ``prompt``, or with ``messages`` a conversation the server
puts in its own chat template (``/v1/chat/completions``). Resumed after a move or a
preemption, it goes on from the text received: the prompt and that text as the new
prompt, or that text as the assistant's unfinished last turn (``continue_final_message``,
which llama-server does for a conversation ending in an assistant turn), with the
tokens left as max_tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class Request:
    """One completion to run remotely. temperature 0 means greedy; seed -1 means random."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int = -1
    stop: tuple[str, ...] = ()
    grammar: str = ""  # GBNF the output must match: llama-server's ``grammar``; "": none
    messages: tuple[tuple[str, str], ...] = ()  # (role, text) turns: a chat; prompt unused

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")


@dataclass(slots=True)
class Progress:
    """What a request has received so far, across endpoints."""

    request: Request
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    moves: int = 0
    failures: int = 0  # attempts that failed
    last_progress: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0  # the server's counts, over every attempt that reported them
    cached_tokens: int = 0  # of those prompt tokens, the ones its cache held

    @property
    def tokens_left(self) -> int:
        return self.request.max_tokens - self.tokens

    @property
    def path(self) -> str:
        return CHAT_PATH if self.request.messages else COMPLETIONS_PATH

    def payload(self, model: str) -> dict[str, Any]:
        """The request's JSON, resuming after what has been received."""
        req = self.request
        text = "".join(self.text)
        payload: dict[str, Any] = {
            "max_tokens": self.tokens_left, "temperature": req.temperature, "top_k": req.top_k,
            "top_p": req.top_p, "seed": req.seed, "stop": list(req.stop), "stream": True,
            "stream_options": {"include_usage": True}}
        if not req.messages:
            payload["prompt"] = req.prompt + text
        else:
            turns = [*req.messages, *([("assistant", text)] if text else [])]
            payload["messages"] = [{"role": role, "content": said} for role, said in turns]
            if text:  # the answer so far is the start of the server's next turn
                payload["continue_final_message"], payload["add_generation_prompt"] = True, False
        if req.grammar:
            payload["grammar"] = req.grammar
        if model:
            payload["model"] = model
        return payload


@dataclass(slots=True)
class Attempt:
    """One request to one endpoint, as its stream is read: the request's token count when
    it began, its finish reason, and whether the server told its usage."""

    start: int
    finish: str | None = None
    told: bool = False  # the server's usage came

    def take_usage(self, usage: dict[str, Any], progress: Progress) -> None:
        """The server's count of the attempt's tokens, told once (with its end)."""
        if self.told:
            return
        self.told = True
        progress.tokens = self.start + usage["completion_tokens"]
        prompt = usage.get("prompt_tokens")
        progress.prompt_tokens += prompt if isinstance(prompt, int) else 0
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        progress.cached_tokens += cached if isinstance(cached, int) else 0
