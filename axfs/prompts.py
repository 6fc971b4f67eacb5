"""Prompt building: the checks a prompt's bytes must pass, its text, and the text and
tokens a model is given for it (a chat template's turns, a fork's follow-up).

Each function raises an ``axfs.errors`` exception saying why; recording the refusal
is the caller's (axfs.refusals).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from axfs.errors import BadInput
from axfs.models import Registry
from axfs.quota import Quota
from axfs.runtime import LocalRuntime, Runtime
from axfs.task import Task
from drivers import chat


class Prompts:
    def __init__(self, registry: Registry, quota: Quota) -> None:
        self.registry = registry
        self.quota = quota

    def check_bytes(self, data: bytes, before: int = 0, uid: int = 0,
                    utf8: codecs.IncrementalDecoder | None = None) -> None:
        """The checks a prompt can fail while it is being written: ``data`` is the newest
        part of it, after ``before`` bytes already checked (``utf8``: the writer's decoder)."""
        self.quota.check_prompt_bytes(uid, before + len(data))
        if b"\0" in data:
            raise BadInput("prompt contains a NUL byte")
        if utf8 is not None:
            held = len(utf8.getstate()[0])
            try:
                utf8.decode(data)
            except UnicodeDecodeError as e:
                raise BadInput(f"prompt is not valid UTF-8 ({e.reason} at byte "
                               f"{before - held + e.start})") from e

    def text(self, uid: int, data: bytes) -> str:
        """The prompt as text, with one trailing newline (echo's) dropped."""
        self.check_bytes(data, uid=uid)
        try:
            text = data.decode("utf-8").removesuffix("\n")
        except UnicodeDecodeError as e:
            raise BadInput(f"prompt is not valid UTF-8 ({e.reason} at byte {e.start})") from e
        if not text.strip():
            raise BadInput("prompt is empty")
        return text

    def template(self, runtime: Runtime) -> str:
        """The chat template of ``runtime``'s model: the registry's, else the file's."""
        entry = self.registry.entries.get(runtime.name)
        template = entry.template if entry else ""
        if not template and isinstance(runtime, LocalRuntime):
            template = getattr(runtime.driver, "chat_template", "")
        if not template:
            raise BadInput(f"model {runtime.name} has no chat template (write 'template NAME' "
                           f"to models/{runtime.name}/ctl, or 'chat off' to config)")
        return template

    def server_templates(self, runtime: Runtime) -> bool:
        """Whether a chat on ``runtime``'s model goes as turns, the server applying its own
        template (``/v1/chat/completions``): a remote model that has no ``template`` set here."""
        entry = self.registry.entries.get(runtime.name)
        return runtime.seq_limit is None and not (entry and entry.template)

    def chat(self, turns: Sequence[tuple[str, str]], runtime: Runtime) -> str:
        """A conversation's (role, text) ``turns`` in the model's template, ending with the
        assistant's opening; a last assistant turn is continued (its text follows that
        opening, as a reply already begun)."""
        begun = turns[-1][1] if turns and turns[-1][0] == "assistant" else ""
        try:
            return chat.render(self.template(runtime), turns[:-1] if begun else turns) + begun
        except chat.ChatError as e:
            raise BadInput(f"chat template: {e}") from e

    def follow_up(self, parent: Task, text: str, runtime: Runtime) -> str:
        """A fork's text as the next user turn of a chat (see drivers.chat)."""
        try:
            return chat.follow_up(self.template(runtime), parent.prompt,
                                  parent.output.decode("utf-8", "replace"), text)
        except chat.ChatError as e:
            raise BadInput(f"chat template: {e}") from e
