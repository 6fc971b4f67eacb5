"""Chat templates (drivers/chat.py) and special tokens in the llama.cpp driver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.chat import ChatError, builtin_names, follow_up, render
from drivers.llamacpp import LlamaCppDriver
from tests.fakes import FakeDriver
from tests.tinymodel import CHAT_TOKENS, CHATML_TEMPLATE, vocab, write_tiny_gguf

CHAT = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")]


def test_chatml() -> None:
    assert render("chatml", [("user", "Hi")]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render("chatml", CHAT, add_assistant=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n")


def test_gemma() -> None:
    # gemma has no system turn: llama.cpp puts the system text at the head of the next
    # user turn; the assistant is "model".
    assert render("gemma", CHAT) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_a_models_own_template_is_recognised() -> None:
    assert render(CHATML_TEMPLATE, CHAT) == render("chatml", CHAT)
    gemma_jinja = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}..."
    assert render(gemma_jinja, CHAT) == render("gemma", CHAT)


def test_long_messages_and_unicode() -> None:
    long = "naïve café 日本 " * 2000
    out = render("chatml", [("user", long)])
    assert out == f"<|im_start|>user\n{long}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("template", ["chatml", "gemma", "llama3", "phi3", CHATML_TEMPLATE])
def test_follow_up_continues_the_conversation(template: str) -> None:
    user, assistant, text = "What is 2+2?", "4.", "And 3+3?"
    context = render(template, [("user", user)]) + assistant
    more = follow_up(template, user, assistant, text)
    assert context + more == render(template, [("user", user), ("assistant", assistant),
                                               ("user", text)])
    assert more.endswith(render(template, [("user", "x")])[-5:])  # the assistant's opening


def test_follow_up_after_a_reply_ending_in_a_newline() -> None:
    # gemma's template trims the reply; the fork continues after the newline it kept.
    more = follow_up("gemma", "Hi", "Hello!\n", "Bye")
    assert more == "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"


def test_follow_up_refuses_a_template_that_rewrites_history() -> None:
    # bailing-think drops the <think> it opened the reply with once the reply is history.
    with pytest.raises(ChatError, match="renders the first turn differently"):
        follow_up("bailing-think", "Hi", "Hello!", "Bye")


@pytest.mark.parametrize("template", ["no-such-template", "", "{{ messages }}"])
def test_unknown_template(template: str) -> None:
    with pytest.raises(ChatError):
        render(template, [("user", "Hi")])
    with pytest.raises(ChatError):
        follow_up(template, "Hi", "Hello", "Bye")


def test_builtin_names() -> None:
    names = builtin_names()
    assert {"chatml", "gemma", "llama3", "mistral-v7", "phi3"} <= set(names)
    for name in names:
        render(name, [("user", "Hi")])


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppDriver]:
    path = write_tiny_gguf(tmp_path_factory.mktemp("chat") / "chat.gguf",
                           chat_template=CHATML_TEMPLATE)
    d = LlamaCppDriver(path, n_ctx=512, n_seq_max=2, n_batch=64)
    yield d
    d.close()


def test_driver_has_the_models_template(chat_model: LlamaCppDriver, tiny_model: Path) -> None:
    assert chat_model.chat_template == CHATML_TEMPLATE
    plain = LlamaCppDriver(tiny_model, n_ctx=256, n_seq_max=1, n_batch=32)
    try:
        assert plain.chat_template == ""
    finally:
        plain.close()


def test_special_tokens_need_special(chat_model: LlamaCppDriver) -> None:
    tokens, _, types = vocab(control=CHAT_TOKENS)
    for text in CHAT_TOKENS:
        token = tokens.index(text)
        assert types[token] == 3  # CONTROL
        assert chat_model.tokenize(text, bos=False, special=True) == [token]
        plain = chat_model.tokenize(text, bos=False)
        assert token not in plain and len(plain) > 1
    # a turn's end ends generation
    assert chat_model.is_eog(tokens.index("<|im_end|>"))
    assert chat_model.is_eog(tokens.index("<end_of_turn>"))
    assert not chat_model.is_eog(tokens.index("<|im_start|>"))


def test_rendered_chat_tokenizes_with_its_markers(chat_model: LlamaCppDriver) -> None:
    tokens, _, _ = vocab(control=CHAT_TOKENS)
    text = render(chat_model.chat_template, [("user", "hello world")])
    ids = chat_model.tokenize(text, special=True)
    start, end = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    assert ids.count(start) == 2 and ids.count(end) == 1
    # A SentencePiece vocabulary with add_space_prefix (the tiny model's; not Gemma's)
    # gets a space at the start of the text after each special token, as in llama.cpp.
    assert b"".join(chat_model.piece(t) for t in ids if t not in (start, end, 1)) == \
        b" user\nhello world \n assistant\n"


def test_fake_driver_accepts_special() -> None:
    assert FakeDriver().tokenize("<x>", special=True) == [ord(c) for c in "<x>"]
