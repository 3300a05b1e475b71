import pytest

from mightylm.tokenizer import Tokenizer, TokenizerError

from conftest import SAMPLE_TEXT

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! naïve 🙂"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]

# A template in the style of real ones: loop controls, raise_exception, tojson, whitespace control.
FANCY_TEMPLATE = """{{ bos_token }}{% for m in messages %}
  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}
  {% if loop.first and m['role'] == 'system' %}[SYS]{{ m['content'] }}[/SYS]
  {% continue %}{% endif %}
  <{{ m['role'] }}>{{ m['content'] | tojson }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_encode_decode_round_trip(bpe_tokenizer):
    ids = bpe_tokenizer.encode(SAMPLE_TEXT)
    assert bpe_tokenizer.decode(ids) == SAMPLE_TEXT
    assert bpe_tokenizer.eos_id == bpe_tokenizer.token_to_id("<|endoftext|>")
    assert bpe_tokenizer.encode("<|im_end|>") == [bpe_tokenizer.token_to_id("<|im_end|>")]


@pytest.mark.parametrize("template", [None, FANCY_TEMPLATE])
def test_chat_template_matches_transformers(bpe_tokenizer, tmp_path, template):
    from transformers import AutoTokenizer

    tok = Tokenizer(bpe_tokenizer.backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                    pad_token="<|endoftext|>", chat_template=template or bpe_tokenizer.chat_template)
    tok.save(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for add in (True, False):
        expected = ref.apply_chat_template(MESSAGES, add_generation_prompt=add, tokenize=False)
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=add) == expected
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)


def test_chat_template_errors(bpe_tokenizer):
    with pytest.raises(TokenizerError, match="'role' and 'content'"):
        bpe_tokenizer.apply_chat_template([{"content": "no role"}])
    broken = Tokenizer(bpe_tokenizer.backend, chat_template="{% for m in messages %}")
    with pytest.raises(TokenizerError, match="syntax error at line 1"):
        broken.apply_chat_template(MESSAGES)
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(bpe_tokenizer.backend).apply_chat_template(MESSAGES)


def test_stream_decoder_reassembles_text_exactly(bpe_tokenizer):
    # multi-byte characters (é, 東, 🙂) are split across byte-level tokens
    ids = bpe_tokenizer.encode(SAMPLE_TEXT)
    decoder = bpe_tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == SAMPLE_TEXT
    assert all("\ufffd" not in p for p in pieces)


def test_sentencepiece_stream_keeps_spaces(tmp_path):
    """SentencePiece decoders strip the leading space of a lone token; streaming must not."""
    from mightylm.tokenizer import from_gguf_metadata

    pieces = ["\u2581", "t", "h", "e", "o", "\u2581t", "he", "\u2581the", "\u2581to"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tok = from_gguf_metadata(meta, "test")
    text = "to the hot théo"
    ids = tok.encode(text, add_special_tokens=False)
    decoder = tok.stream_decoder()
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == tok.decode(ids) == text


def test_from_dir_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json: not found"):
        Tokenizer.from_dir(tmp_path)


def test_train_bpe_missing_file(tmp_path):
    from mightylm.tokenizer import train_bpe

    with pytest.raises(TokenizerError, match="not found: .*nope.txt"):
        train_bpe([tmp_path / "nope.txt"])
