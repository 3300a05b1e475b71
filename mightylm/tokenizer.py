"""A thin wrapper over Hugging Face `tokenizers`: encode/decode, special tokens, chat templates,
incremental (streaming) decoding, training a byte-level BPE, and rebuilding a tokenizer from the
vocabulary a GGUF file carries.

Chat templates are rendered with jinja2 in a sandbox, with the same environment settings and
helpers (`raise_exception`, `strftime_now`, `tojson`) that `transformers.apply_chat_template`
uses, so the same template gives the same text.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from mightylm.errors import MightyError


class TokenizerError(MightyError, ValueError):
    """A tokenizer file we cannot use; the message names the file and what is wrong."""


class Tokenizer:
    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        stop_token_ids: tuple[int, ...] = (),
    ):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.bos_id = self.token_to_id(bos_token)
        self.eos_id = self.token_to_id(eos_token)
        self.pad_id = self.token_to_id(pad_token)
        # Tokens that end generation: eos plus any the generation config adds (e.g. <|im_end|>).
        self.stop_token_ids = tuple(dict.fromkeys([*([self.eos_id] if self.eos_id is not None else []), *stop_token_ids]))

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ----

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render a conversation as text, as `transformers`' `apply_chat_template(tokenize=False)` does."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template; use `generate` with a plain prompt")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        template = _compile_template(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself, so special tokens are not added again (as transformers does).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
                           add_special_tokens=False)

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- files ----

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise TokenizerError(f"{tok_file}: not found; mightylm reads tokenizers in the `tokenizers` JSON format")
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a plain Exception with the parse error
            raise TokenizerError(f"{tok_file}: cannot be read as a tokenizer ({e})") from None
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if (path / "chat_template.jinja").exists():  # transformers >= 4.43 saves it beside the config
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        gen = _read_json(path / "generation_config.json")
        eos = gen.get("eos_token_id")
        stops = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return cls(
            backend,
            bos_token=_token_str(config.get("bos_token")),
            eos_token=_token_str(config.get("eos_token")),
            pad_token=_token_str(config.get("pad_token")),
            chat_template=template,
            stop_token_ids=stops,
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja, as transformers reads them."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template:
            (path / "chat_template.jinja").write_text(self.chat_template)


class StreamDecoder:
    """Turns a stream of token ids into text deltas with no broken UTF-8 or lost spaces.

    Decoding token by token breaks multi-byte characters split across tokens and drops the
    leading space some decoders strip. So we decode a short window of recent tokens, twice
    (with and without the newest), and emit the difference, holding back while the tail is
    an incomplete character (U+FFFD). The same scheme as vLLM's incremental detokenizer.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # tokens already turned into emitted text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.backend.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        after = decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        decode = self.tokenizer.backend.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        after = decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None


def _token_str(token) -> str | None:
    if isinstance(token, dict):  # serialized AddedToken
        return token.get("content")
    return token


@lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers overrides it the same way.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


# ---- training ----


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def check_bpe_vocab(vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> None:
    """Refuse a vocabulary a byte-level BPE cannot have: every byte and the special tokens come first."""
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise TokenizerError(f"a byte-level BPE needs a vocabulary of at least {smallest} tokens (256 bytes and "
                             f"{len(special_tokens)} special tokens), got {vocab_size}; pass --vocab_size {smallest} "
                             "or more (thousands are usual)")


def train_bpe(
    files: list[str | Path] = (),
    vocab_size: int = 8192,
    *,
    texts=None,
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
    chat_template: str | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on text files, or on an iterable of `texts`.

    The first special token serves as bos, eos and pad. The default chat template is ChatML,
    which the `<|im_start|>`/`<|im_end|>` specials make possible.
    """
    from tokenizers import trainers

    missing = [str(f) for f in files if not Path(f).exists()]
    if missing:
        raise TokenizerError(f"training files not found: {', '.join(missing)}")
    check_bpe_vocab(vocab_size, special_tokens)
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    if texts is not None:
        backend.train_from_iterator(texts, trainer)
    else:
        backend.train([str(f) for f in files], trainer)
    eos = special_tokens[0]
    return Tokenizer(backend, bos_token=eos, eos_token=eos, pad_token=eos,
                     chat_template=chat_template or CHATML_TEMPLATE, stop_token_ids=_ids(backend, special_tokens[2:3]))


def _ids(backend: Backend, tokens) -> tuple[int, ...]:
    return tuple(i for t in tokens if (i := backend.token_to_id(t)) is not None)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---- GGUF vocabularies ----

# How llama.cpp splits text before BPE, by `tokenizer.ggml.pre` (llama.cpp src/llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # digits one by one, then GPT-2's pattern
    "llama3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
}


def from_gguf_metadata(meta: dict, source: str) -> Tokenizer:
    """Rebuild the tokenizer stored in a GGUF file's `tokenizer.*` metadata.

    'gpt2' vocabularies are byte-level BPE with explicit merges; 'llama' ones are SentencePiece
    BPE whose merges are recovered from the token scores (a higher score merges first).
    """
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"{source}: no tokenizer.ggml.tokens in the GGUF metadata")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = Backend(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        splits = _PRE_SPLITS.get(pre, _PRE_SPLITS["default"])
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = _merges_from_scores(tokens, scores, types)
        unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
        backend = Backend(models.BPE(vocab, merges, unk_token=tokens[unk], fuse_unk=True, byte_fallback=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([
            decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)
        ])
    else:
        raise TokenizerError(f"{source}: GGUF tokenizer model {kind!r} is not supported; supported: gpt2, llama")
    # Control (3) tokens are special; user-defined (4) ones are matched whole but kept in decoded text.
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    backend.add_special_tokens(special)
    backend.add_tokens(user)

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, pad = token("bos_token_id"), token("eos_token_id"), token("padding_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    template = meta.get("tokenizer.chat_template")
    stops = _ids(backend, ["<|im_end|>", "<|eot_id|>", "<|end|>"]) if template else ()
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template,
                     stop_token_ids=stops)


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by a vocabulary: every split of a normal token into two
    vocabulary pieces, ordered by the merged token's score, best first (as transformers does)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == 1}
    found = []
    for token, i in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[i], vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


# ---- writing a vocabulary into GGUF metadata ----

# llama.cpp names a BPE pre-tokenizer by the sha256 of str(the ids of this text), encoded with special tokens as
# transformers does (convert_hf_to_gguf.py, get_vocab_base_pre); the hashes below are the ones it lists for the
# families small models come from.
PRE_PROBE = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated)'
    ' ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天'
    '～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s '
    'there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}
# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def pre_tokenizer_name(tokenizer: Tokenizer) -> tuple[str, str]:
    """(llama.cpp's `tokenizer.ggml.pre` name, how it was found) for a byte-level BPE tokenizer: by the probe hash
    for a known tokenizer, else by the shape of its pre-tokenizer (GPT-2's regex inside ByteLevel: "gpt-2"; digits
    split first, then GPT-2's regex, as SmolLM: "smollm"), else "default" (llama.cpp's default split; a warning
    is due: text may split differently there)."""
    import hashlib

    digest = hashlib.sha256(str(tokenizer.encode(PRE_PROBE)).encode()).hexdigest()
    if digest in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[digest], "probe hash"
    pre = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2", "ByteLevel with GPT-2's split"
    patterns = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if patterns == [r"\p{N}", _GPT2_SPLIT]:
        return "smollm", "digits, then GPT-2's split"
    if patterns in ([_LLAMA3_SPLIT], [_QWEN2_SPLIT]):
        return ("llama-bpe" if patterns == [_LLAMA3_SPLIT] else "qwen2"), "its split pattern"
    return "default", f"unknown (probe hash {digest[:16]}...)"


def gguf_vocab(tokenizer: Tokenizer, n_vocab: int) -> tuple[dict, str]:
    """The `tokenizer.*` GGUF metadata of a BPE tokenizer, its token list padded with unused tokens to the model's
    `n_vocab` rows, and a note on how it was written. The inverse of `from_gguf_metadata`:
    - byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM style): llama.cpp's "gpt2" model, with merges and the
      pre-tokenizer's name (see pre_tokenizer_name);
    - SentencePiece-style BPE (byte fallback, "\u2581" for spaces: Llama 2, Mistral): llama.cpp's "llama" model,
      merges given as scores (a token's score is minus the rank of the merge that makes it, so the best-scored
      pair merges first, as in BPE), byte tokens <0xXX> typed as bytes."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    around = json.dumps([spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")], ensure_ascii=False)
    if model.get("type") == "BPE" and "ByteLevel" in around:
        kind = "gpt2"
    elif model.get("type") == "BPE" and model.get("byte_fallback") and "\u2581" in around:
        kind = "llama"
    else:
        raise TokenizerError(f"only BPE tokenizers, byte-level (GPT-2, Llama 3, Qwen2, SmolLM style) or SentencePiece-"
                             f"style with byte fallback (Llama 2, Mistral), can be written to GGUF; this one is a "
                             f"{model.get('type')} model with pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')}")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_vocab:
        raise TokenizerError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} "
                             "embedding rows")
    added = tokenizer.backend.get_added_tokens_decoder()
    unk = model.get("unk_token")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for token, i in vocab.items():
        tokens[i] = token
        if i in added:
            types[i] = CONTROL if added[i].special else USER_DEFINED
        elif kind == "llama" and token == unk:
            types[i] = UNKNOWN
        elif kind == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[i] = BYTE
        else:
            types[i] = NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = "a"
    with_specials, plain = tokenizer.encode(probe), tokenizer.encode(probe, add_special_tokens=False)
    meta = {
        "tokenizer.ggml.model": kind,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_bos_token": len(with_specials) > len(plain) and with_specials[0] == tokenizer.bos_id,
        "tokenizer.ggml.add_eos_token": len(with_specials) > len(plain) and with_specials[-1] == tokenizer.eos_id,
    }
    if kind == "gpt2":
        pre, how = pre_tokenizer_name(tokenizer)
        meta.update({"tokenizer.ggml.pre": pre, "tokenizer.ggml.merges": merges})
        note = f"{pre} ({how})"
    else:
        scores = [0.0] * n_vocab
        scored = set()
        for rank, merge in enumerate(merges):
            i = vocab.get(merge.replace(" ", "", 1))
            if i is not None and i not in scored:
                scores[i], scored = -float(rank), scored | {i}
        meta.update({"tokenizer.ggml.pre": "default", "tokenizer.ggml.scores": scores,
                     "tokenizer.ggml.add_space_prefix": True})
        if unk in vocab:
            meta["tokenizer.ggml.unknown_token_id"] = vocab[unk]
        note = "SentencePiece-style BPE (merges as scores)"
    for key, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("padding", tokenizer.pad_id)):
        if i is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    others = [i for i in tokenizer.stop_token_ids if i != tokenizer.eos_id]
    if others:  # the end of a chat turn (<|im_end|>, <|eot_id|>): llama.cpp stops there too
        meta["tokenizer.ggml.eot_token_id"] = others[0]
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta, note
