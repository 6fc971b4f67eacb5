"""An OpenAI request's body as what the tree takes: ``config`` lines, a schema or a
grammar, and the prompt (a completion's) or the conversation (a chat's).

Each parameter the tree knows becomes its config line, checked by the kernel as a
line written to ``config`` is (axfs.config): the sampler's (llama-server's names for
``min_p`` and the penalties) and logprobs (``config logprobs N``, N the alternatives a
token shows, at least 1: the tree's 0 is off). A parameter that would change the answer
in a way the tree cannot do (``n`` above 1, ``logit_bias``) is refused with the reason
rather than ignored; others (``user``, ``stream_options`` but its usage flag) are
ignored, as other servers do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from axfs.config import escape
from axfs.errors import BadInput, NotFound

# body key -> config key; numbers checked as config checks them
NUMBERS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
           "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
           "priority": "priority", "deadline": "deadline", "min_p": "min_p",
           "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
INTEGERS = frozenset({"max_tokens", "max_completion_tokens", "top_k", "seed", "priority",
                      "repeat_last_n", "logprobs", "top_logprobs"})
# Parameters the tree does not have, accepted at the value that changes nothing.
NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "logit_bias": (None, {}), "typical_p": (None, 1), "tools": (None, []), "functions": (None, []),
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(slots=True)
class Ask:
    """One request, as the tree takes it."""

    chat: bool
    model: str  # the registry's name; "" for the default model
    prompt: str  # a completion's prompt; a chat's conversation in words (tasks/ID/prompt)
    config: str  # "key value" lines, as written to tasks/ID/config
    turns: list[tuple[str, str]] = field(default_factory=list)  # a chat's (role, text)
    schema: str = ""  # JSON Schema the answer must follow
    grammar: str = ""  # GBNF the answer must follow
    stream: bool = False
    include_usage: bool = False  # a streamed answer ends with a usage chunk
    logprobs: int | None = None  # the answer's logprobs show this many alternatives a token


def parse(body: object, chat: bool, models: set[str]) -> Ask:
    """The request ``body`` (parsed JSON) of ``/v1/chat/completions`` (``chat``) or
    ``/v1/completions``; BadInput saying what is wrong, NotFound for a model that is not
    in the registry (``models``)."""
    if not isinstance(body, dict):
        raise BadInput("the request body must be a JSON object")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise BadInput("model: expected a string")
    if model and model not in models:
        raise NotFound(f"no model named {model!r} (models: {', '.join(sorted(models)) or 'none'})")
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in neutral:
            raise BadInput(f"{key}: axfs does not support {key} {json.dumps(body[key])[:40]} "
                           f"(only {' or '.join(json.dumps(v) for v in neutral if v is not None)})")
    lines = [f"model {model}"] if model else []
    lines += _numbers(body) + _stops(body.get("stop")) + ["chat on" if chat else "chat off"]
    ask = Ask(chat, model, "", "", stream=_flag(body, "stream"))
    options = body.get("stream_options")
    ask.include_usage = isinstance(options, dict) and options.get("include_usage") is True
    lines += _output(body, ask)
    ask.logprobs = _logprobs(body, chat)
    if ask.logprobs is not None:
        lines.append(f"logprobs {ask.logprobs or 1}")  # out of 0..20: the tree says so
    ask.config = "".join(f"{line}\n" for line in lines)
    if chat:
        ask.turns = _turns(body.get("messages"), _flag(body, "continue_final_message"))
        ask.prompt = ask.turns[0][1] if len(ask.turns) == 1 else \
            "\n\n".join(f"{role}: {text}" for role, text in ask.turns)
    else:
        ask.prompt = _prompt(body.get("prompt"))
    return ask


def _flag(body: dict[str, object], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadInput(f"{key}: expected true or false")
    return value


def _numbers(body: dict[str, object]) -> list[str]:
    return [f"{config_key} {_number(body, key)!r}" for key, config_key in NUMBERS.items()
            if body.get(key) is not None]


def _number(body: dict[str, object], key: str) -> int | float:
    value = body[key]
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or (key in INTEGERS and not whole):
        raise BadInput(f"{key}: expected {'an integer' if key in INTEGERS else 'a number'}, "
                       f"not {json.dumps(value)[:40]}")
    return int(value) if key in INTEGERS else value


def _logprobs(body: dict[str, object], chat: bool) -> int | None:
    """The alternatives a token the answer's logprobs show, None for no logprobs: a chat's
    ``top_logprobs`` (0 unless given) when its ``logprobs`` is true, a completion's
    ``logprobs`` (0 too gives the tokens' own, as OpenAI's)."""
    top = body.get("top_logprobs")
    if chat and _flag(body, "logprobs"):
        return _integer(body, "top_logprobs") if top is not None else 0
    if top not in (None, 0):
        raise BadInput("top_logprobs: needs logprobs true" if chat else
                       "top_logprobs: a chat's parameter (a completion's is logprobs N)")
    value = body.get("logprobs")
    if chat or value is None or value is False:  # (0 == False: not ``in``)
        return None
    return _integer(body, "logprobs")


def _integer(body: dict[str, object], key: str) -> int:
    return int(_number(body, key))


def _stops(stop: object) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadInput("stop: expected a string or a list of strings")
    return [f"stop {escape(s)}" for s in stops if s]


def _output(body: dict[str, object], ask: Ask) -> list[str]:
    """``response_format`` (and llama-server's ``grammar`` and ``json_schema``) as the
    answer's format, schema or grammar."""
    fmt = body.get("response_format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    schema: object = body.get("json_schema")
    if isinstance(fmt, dict) and kind == "json_schema":
        inner = fmt.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, dict) else None
        if not isinstance(schema, dict):
            raise BadInput("response_format: json_schema needs {\"json_schema\": {\"schema\": {...}}}")
    elif isinstance(fmt, dict) and kind == "json_object":
        schema = fmt.get("schema", schema)
    elif kind != "text":
        raise BadInput("response_format: expected type text, json_object or json_schema")
    grammar = body.get("grammar") or ""
    if not isinstance(grammar, str):
        raise BadInput("grammar: expected GBNF text")
    if schema is not None:
        if not isinstance(schema, dict):
            raise BadInput("json_schema: expected a JSON Schema object")
        ask.schema = json.dumps(schema)
    ask.grammar = grammar
    if ask.schema and ask.grammar:
        raise BadInput("give a grammar or a JSON schema, not both")
    return ["format json"] if kind == "json_object" and not ask.schema else []


def _prompt(prompt: object) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadInput("prompt: expected a string (one prompt a request; token ids are not taken)")
    return prompt


def _turns(messages: object, continue_last: bool) -> list[tuple[str, str]]:
    """The conversation; a last assistant message is continued only when asked
    (``continue_final_message``), as the kernel continues a last assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise BadInput("messages: expected a list of {\"role\", \"content\"} objects")
    turns: list[tuple[str, str]] = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadInput(f"messages[{n}]: expected a role of {', '.join(ROLES)} and its content")
        turns.append((ROLES[message["role"]], _content(message.get("content"), n)))
    if (turns[-1][0] == "assistant") != continue_last:
        raise BadInput("continue_final_message: the last message must be the assistant's "
                       "to continue" if continue_last else
                       "messages: the last is the assistant's (set continue_final_message to "
                       "continue it)")
    return turns


def _content(content: object, n: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadInput(f"messages[{n}].content: expected text (a string, or parts of type text)")
