"""A task's answer in OpenAI's shapes: a whole completion or chat completion, and the
chunks of a streamed one (server-sent events), with the ``usage`` block.

A completion's ``id`` is the task's id: ``cat tasks/ID/status`` finds it in the tree.
The tree's finish reasons become OpenAI's: the end-of-generation token and stop
strings ``stop``; max_tokens, a full context and a deadline ``length``.
"""

from __future__ import annotations

import json
from typing import Any

from axfs.task import Task
from axfs.timeline import Finish

FINISH = {Finish.EOS: "stop", Finish.STOP: "stop", Finish.LENGTH: "length",
          Finish.CONTEXT: "length", Finish.DEADLINE: "length"}


def finish_reason(task: Task) -> str | None:
    return FINISH.get(task.finish_reason) if task.finish_reason else None


def usage(task: Task) -> dict[str, int]:
    """The tokens of the prompt (the model's text: a chat's in its template) and of the
    answer; on a remote model, the pieces it streamed."""
    prompt = len(task.prompt_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": task.num_generated,
            "total_tokens": prompt + task.num_generated}


def _head(task: Task, chat: bool, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
    return {"id": task.id, "object": kind, "created": int(task.submitted_at or task.created_at),
            "model": task.config.model}


def whole(task: Task, chat: bool, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The answer of a finished task, not streamed, with its ``logprobs`` if asked
    (axfs.http.logprobs)."""
    text = task.output.decode("utf-8", "replace")
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(task), "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {**_head(task, chat, False), "choices": [choice], "usage": usage(task)}


def event(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def chunk(task: Task, chat: bool, text: str, first: bool = False, finish: str | None = None,
          logprobs: dict[str, Any] | None = None) -> bytes:
    """A streamed chunk of ``text`` (a chat's first also says the role), with the
    ``logprobs`` of its tokens if asked, or the closing one with its ``finish`` reason."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text or not finish:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text
    return event({**_head(task, chat, True), "choices": [choice]})


def usage_chunk(task: Task, chat: bool) -> bytes:
    """The chunk after the last that carries the usage (``stream_options.include_usage``)."""
    return event({**_head(task, chat, True), "choices": [], "usage": usage(task)})
