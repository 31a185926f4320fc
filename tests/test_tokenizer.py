"""Tokenizer loading, chat-template rendering and incremental detokenisation."""
from __future__ import annotations

import pytest

from tokenmill.model.tokenizer import IncrementalDetokenizer, Tokenizer

MULTIBYTE_TEXTS = [
    "Hello 😀 world",
    "你好，世界！这是一个测试。",
    "emoji family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, café naïve résumé — ok",
    "日本語のテキストと한국어 텍스트 mixed with ASCII 123",
    "🙂🙃😉😊😇🥰😍🤩",
]


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_gguf_path) -> Tokenizer:
    return Tokenizer.from_path(smollm2_gguf_path)


@pytest.fixture(scope="session")
def byte_bpe_tok(tmp_path_factory) -> Tokenizer:
    """A tiny byte-level BPE (GPT-2 style) trained here: multi-byte characters span several tokens."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]
    )
    rust.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 5, "hello world, hello there"], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>")
    path = str(tmp_path_factory.mktemp("byte_bpe"))
    hf.save_pretrained(path)
    return Tokenizer.from_path(path)


# ----------------------------------------------------------------------------- Tokenizer


def test_smollm2_tokenizer_basics(smollm2_tok, smollm2_hf_tokenizer):
    tok = smollm2_tok
    assert tok.vocab_size == len(tok) == 49152
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = "The capital of France is Paris. 😀"
    ids = tok.encode(text)
    assert ids == smollm2_hf_tokenizer.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([1] + ids + [2]) == text
    assert tok.decode([1] + ids + [2], skip_special_tokens=False) == "<|im_start|>" + text + "<|im_end|>"


def test_tokenizer_from_hf_dir(smollm2_tokenizer_dir, smollm2_tok):
    tok = Tokenizer.from_path(smollm2_tokenizer_dir)
    assert tok.vocab_size == smollm2_tok.vocab_size
    assert tok.eos_token_id == smollm2_tok.eos_token_id
    assert tok.chat_template == smollm2_tok.chat_template
    for text in MULTIBYTE_TEXTS:
        assert tok.encode(text) == smollm2_tok.encode(text)


def test_tokenizer_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_path(str(tmp_path / "missing_dir"))


# ----------------------------------------------------------------------------- chat templates

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. 你好 😀"},
        {"role": "user", "content": "Name three colours."},
    ],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(smollm2_tok, smollm2_hf_tokenizer, conv, add_generation_prompt):
    ours = smollm2_tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
    ref = smollm2_hf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_text_parts(smollm2_tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    plain = [{"role": "user", "content": "first\nsecond"}]
    assert smollm2_tok.apply_chat_template(parts) == smollm2_tok.apply_chat_template(plain)


def test_chat_template_custom_features(smollm2_tok, smollm2_hf_tokenizer):
    """Whitespace control, tojson, loop controls, bos/eos tokens and extra variables render like transformers."""
    template = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'tool' %}{% continue %}{% endif %}\n"
        "    [{{ m['role'] }}] {{ m['content'] | tojson }}\n"
        "{% endfor %}\n"
        "{% if tools %}{{ tools | tojson }}{% endif %}\n"
        "{% if add_generation_prompt %}[assistant]{% endif %}{{ eos_token }}"
    )
    conv = [
        {"role": "user", "content": "a <b> & 'c' é"},
        {"role": "tool", "content": "ignored"},
        {"role": "assistant", "content": "ok"},
    ]
    tools = [{"name": "f", "description": "<x>"}]
    tok = Tokenizer(smollm2_hf_tokenizer, template)
    ours = tok.apply_chat_template(conv, tools=tools)
    ref = smollm2_hf_tokenizer.apply_chat_template(
        conv, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert ours == ref
    assert '"a <b> & \'c\' é"' in ours


def test_chat_template_errors(smollm2_tok, smollm2_hf_tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(smollm2_hf_tokenizer, None).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty"):
        smollm2_tok.apply_chat_template([])
    with pytest.raises(ValueError, match="invalid role 'robot'"):
        smollm2_tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="only text parts"):
        smollm2_tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])

    from jinja2.exceptions import TemplateError

    raising = Tokenizer(smollm2_hf_tokenizer, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])
    # the sandbox refuses attribute access to internals
    from jinja2.exceptions import SecurityError

    sneaky = Tokenizer(smollm2_hf_tokenizer, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(SecurityError):
        sneaky.apply_chat_template([{"role": "user", "content": "x"}])


# ----------------------------------------------------------------------------- incremental detokenisation


def _stream(detok: IncrementalDetokenizer, ids: list[int], **kw) -> list[str]:
    """Feed ids one by one; return output_text after each token."""
    texts = []
    for t in ids:
        detok.add(t, **kw)
        texts.append(detok.output_text)
    return texts


@pytest.mark.parametrize("which", ["smollm2", "byte_bpe"])
@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_incremental_decode_multibyte(request, which, text):
    tok = request.getfixturevalue("smollm2_tok" if which == "smollm2" else "byte_bpe_tok")
    prompt = tok.encode("Say something:", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some character really is split across tokens
    detok = IncrementalDetokenizer(tok, prompt)
    texts = _stream(detok, ids)
    assert detok.output_text == tok.decode(ids) == text
    for prev, cur in zip(texts, texts[1:]):
        assert cur.startswith(prev)  # append-only
        assert "\ufffd" not in cur  # incomplete characters are never emitted
    assert detok.token_ids == ids


def test_incremental_decode_with_special_tokens(smollm2_tok):
    ids = [1] + smollm2_tok.encode("Hi 😀 there") + [2]
    detok = IncrementalDetokenizer(smollm2_tok, [], skip_special_tokens=True)
    _stream(detok, ids)
    assert detok.output_text == smollm2_tok.decode(ids) == "Hi 😀 there"
    detok = IncrementalDetokenizer(smollm2_tok, [], skip_special_tokens=False)
    _stream(detok, ids)
    assert detok.output_text == smollm2_tok.decode(ids, skip_special_tokens=False)


def test_incremental_decode_window_is_bounded(smollm2_tok):
    class Counting:
        def __init__(self, tok):
            self.tok, self.longest = tok, 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    text = "Streaming text with 中文 and 😀 emoji. " * 40
    ids = smollm2_tok.encode(text)
    counting = Counting(smollm2_tok)
    detok = IncrementalDetokenizer(counting, list(range(100, 400)))
    _stream(detok, ids)
    assert detok.output_text == smollm2_tok.decode(ids)
    assert len(ids) > 400 and counting.longest <= 12


def test_flush_releases_incomplete_character(smollm2_tok):
    ids = smollm2_tok.encode("a😀")
    detok = IncrementalDetokenizer(smollm2_tok, [])
    _stream(detok, ids[:-1])  # the emoji's last byte is missing
    assert detok.output_text == "a"
    assert detok.flush() is None
    assert detok.output_text == smollm2_tok.decode(ids[:-1])
    assert detok.output_text.endswith("\ufffd")


def _spanning_stop(tok, ids: list[int]) -> tuple[str, int]:
    """A stop string that straddles a token boundary, and the index of the token completing it."""
    for i in range(3, len(ids)):
        left, right = tok.decode(ids[:i]), tok.decode(ids[i : i + 1])
        stop = left[-2:] + right[:2]
        if len(left) >= 3 and len(right) >= 3 and (left + right).find(stop) == len(left) - 2:
            return stop, i
    raise AssertionError("no suitable token boundary")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(smollm2_tok, include):
    text = "The weather today is wonderful and sunny everywhere."
    ids = smollm2_tok.encode(text)
    stop, at = _spanning_stop(smollm2_tok, ids)
    detok = IncrementalDetokenizer(smollm2_tok, [], stop_strings=["zzz", stop], include_stop_str_in_output=include)
    results = [detok.add(t) for t in ids[: at + 1]]
    assert results[:-1] == [None] * at
    assert results[-1] == stop and detok.stop_reason == stop and detok.finished
    idx = text.index(stop)
    assert detok.output_text == (text[: idx + len(stop)] if include else text[:idx])
    assert detok.stream_text == detok.output_text


def test_stop_string_earliest_match_and_multibyte(smollm2_tok):
    ids = smollm2_tok.encode("abc 😀 def xyz")
    detok = IncrementalDetokenizer(smollm2_tok, [], stop_strings=["def", "😀 d"])
    stops = [detok.add(t) for t in ids]
    assert "😀 d" in stops and "def" not in stops
    assert detok.output_text == "abc "


def test_stop_not_checked_when_disabled(smollm2_tok):
    ids = smollm2_tok.encode("one two three")
    detok = IncrementalDetokenizer(smollm2_tok, [], stop_strings=["two"])
    assert all(detok.add(t, check_stop=False) is None for t in ids)
    assert detok.output_text == "one two three"


def test_stream_text_holds_back_partial_stop(byte_bpe_tok):
    tok = byte_bpe_tok
    text = "hello <EN world <END> tail"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop_strings=["<END>"])
    chunks, stop = [], None
    for t in ids:
        stop = detok.add(t)
        stream = detok.stream_text
        if stop is None:
            assert not any(stream.endswith("<END>"[:k]) for k in range(1, 5))
        assert detok.output_text.startswith(stream)
        chunks.append(detok.next_stream_chunk())
        if stop:
            break
    assert stop == "<END>"
    assert detok.output_text == "hello <EN world "
    assert "".join(chunks) == detok.output_text  # streamed chunks add up to the final text


def test_stream_text_examples(byte_bpe_tok):
    detok = IncrementalDetokenizer(byte_bpe_tok, [], stop_strings=["<END>", "STOP"])
    for t in byte_bpe_tok.encode("abc <EN", add_special_tokens=False):
        detok.add(t)
    assert detok.output_text == "abc <EN"
    assert detok.stream_text == "abc "
    assert detok.next_stream_chunk() == "abc "
    for t in byte_bpe_tok.encode("D", add_special_tokens=False):
        assert detok.add(t) is None
    assert detok.stream_text == "abc "  # "<END" is still a proper prefix of "<END>"
    assert detok.next_stream_chunk() == ""
    for t in byte_bpe_tok.encode("! ST", add_special_tokens=False):
        assert detok.add(t) is None
    assert detok.stream_text == "abc <END! "  # "ST" may still become "STOP"
    assert detok.next_stream_chunk() == "<END! "
    assert detok.next_stream_chunk(final=True) == "ST"  # the end of the output releases everything
