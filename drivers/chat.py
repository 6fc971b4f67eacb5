"""Chat templates: a conversation as the text a chat model was trained on.

Rendering goes through llama.cpp's ``llama_chat_apply_template``, which knows a fixed
set of formats. It takes a built-in name ("chatml", "gemma", "llama3", ...:
``builtin_names()``) or a model's own template (a GGUF's ``tokenizer.chat_template``);
it does not run a template's Jinja, it recognises the format by the markers in it
(``<|im_start|>`` means chatml, ``<start_of_turn>`` gemma, ...) and writes that format.

In axfs a conversation is a chain of forks: a child's context is its parent's context
(prompt and generated text) and then the text the fork appends. ``follow_up`` is that
text when chat is on.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp as lc


class ChatError(ValueError):
    """A conversation cannot be rendered with a template (the message says why)."""


def render(template: str, messages: Sequence[tuple[str, str]], add_assistant: bool = True) -> str:
    """``messages`` ((role, content) pairs; roles "system", "user", "assistant") in the
    format of ``template``, ending with the assistant's opening when ``add_assistant``.

    ChatError when llama.cpp does not know the template.
    """
    if not template:
        raise ChatError("no chat template (the model has none and none was given)")
    keep = [(role.encode(), content.encode()) for role, content in messages]
    chat = (lc.llama_chat_message * max(1, len(keep)))()
    for i, (role, content) in enumerate(keep):
        chat[i].role = role
        chat[i].content = content
    tmpl = template.encode()
    cap = 256 + 2 * sum(len(r) + len(c) for r, c in keep)
    while True:
        buf = ctypes.create_string_buffer(cap)
        n = lc.llama_chat_apply_template(tmpl, chat, len(keep), add_assistant, buf, cap)
        if n < 0:
            shown = template if len(template) <= 40 else template[:37] + "..."
            raise ChatError(f"llama.cpp does not know the chat template {shown!r}; "
                            f"built-in names: {', '.join(builtin_names())}")
        if n <= cap:
            return buf.raw[:n].decode("utf-8", "replace")
        cap = n


def follow_up(template: str, user: str, assistant: str, text: str) -> str:
    """The text that continues the context ``render(template, [("user", user)]) +
    assistant`` with the user's next message ``text``, ending with the assistant's
    opening, so that the whole is ``render(template, [("user", user), ("assistant",
    assistant), ("user", text)])``.

    Whitespace around the reply is let differ (gemma's template trims a reply that
    ends with a newline; mistral's puts a space before it): the follow-up then
    continues after the reply as it was generated, and the whole differs from the
    rendering only there. ChatError when the rendering does not begin with the context
    otherwise (the template rewrites earlier turns, e.g. drops a model's reasoning), or
    when the template is unknown.
    """
    before = render(template, [("user", user)])
    full = render(template, [("user", user), ("assistant", assistant), ("user", text)])
    if not full.startswith(before):
        raise ChatError(f"chat template {template[:40]!r} renders the first turn differently "
                        "once a reply follows it, so a fork cannot continue the context")
    rest = full[len(before):]
    if rest.startswith(assistant):
        return rest[len(assistant):]
    # Whitespace around the reply may differ: gemma's template trims it; mistral's puts
    # a space before it, which a model's first generated token usually carries too.
    said = assistant.strip()
    start = len(rest) - len(rest.lstrip())
    if rest.startswith(said, start):
        return rest[start + len(said):]
    raise ChatError(f"chat template {template[:40]!r} rewrites the assistant's reply, so a "
                    "fork cannot continue the context")


def builtin_names() -> list[str]:
    """The template names this llama.cpp knows ("chatml", "gemma", "llama3", ...)."""
    n = lc.llama_chat_builtin_templates((ctypes.c_char_p * 0)(), 0)
    names = (ctypes.c_char_p * n)()
    lc.llama_chat_builtin_templates(names, n)
    return [name.decode() for name in names if name is not None]
