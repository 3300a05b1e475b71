"""`mighty <verb>`: each verb is a plain function with typed arguments; jsonargparse builds the
parser and the --help text from the signatures and docstrings."""

from __future__ import annotations

import sys
from typing import Literal

from mightylm.options import ClosedUnitInterval, Fraction, NonNegativeFloat, PositiveInt, Probability, Seed

DEFAULT_MODEL = "smollm2-135m-instruct"
DType = Literal["float32", "bfloat16", "float16"]


def generate(
    prompt: str,
    model: str = DEFAULT_MODEL,
    max_new_tokens: PositiveInt = 128,
    temperature: NonNegativeFloat = 0.7,
    top_k: PositiveInt | None = None,
    top_p: Probability | None = 0.9,
    seed: Seed | None = None,
    stop: list[str] | None = None,
    chat: bool = False,
    dtype: DType = "float32",
    adapter: str | None = None,
    stats: bool = False,
    blocks: bool = True,
    int8_activations: bool = False,
    kv_cache: Literal["float32", "float16"] = "float32",
    draft: str | None = None,
    gamma: PositiveInt | None = None,
    draft_adapter: str | None = None,
    lookup_history: str | None = None,
    rope_scaling: str | None = None,
    rmt: str | None = None,
    attention_sinks: str | None = None,
    image: list[str] | None = None,
    engine: Literal["auto", "torch"] = "auto",
    device: str = "cpu",
    compile: bool = False,
) -> None:
    """Stream the completion of a prompt to stdout.

    With --temperature 0 decoding is greedy and deterministic; only the generated text is printed
    (progress goes to stderr), so the output can be compared with other tools.

    Args:
        prompt: The text to continue.
        model: A Hugging Face model directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        max_new_tokens: Generate at most this many tokens.
        temperature: Sampling temperature; 0 is greedy.
        top_k: Sample only among the k most likely tokens.
        top_p: Nucleus sampling: sample among the most likely tokens that together hold this probability.
        seed: Random seed for sampling; the same seed gives the same text.
        stop: Stop strings; generation ends before the first one (repeat the option for several).
        chat: Wrap the prompt as a user message in the model's chat template.
        dtype: Weight and activation precision.
        adapter: An adapter directory to apply, unmerged: LoRA, prompt tuning or P-tuning (ours or PEFT's),
            or LLaMA-Adapter (ours).
        stats: Print the prompt's prefill and the decoding speed (tokens/s) to stderr at the end.
        blocks: Keep a GGUF file's Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q4_K / Q6_K / F16 / BF16 projection and head weights
            as stored (a quarter to a half of the memory, a faster start and decode), multiplied by native kernels
            that read the blocks; false dequantizes them to --dtype at load. Other files and types, and any --dtype
            but float32, load dequantized.
        int8_activations: With --blocks: round every token's activations (the prompt's too) to 8 bits per block of
            32 before the Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K blocks multiply them, in integers, as llama.cpp does:
            faster decoding, ~3x faster prompts and cheap speculative passes (--draft), at the cost of float32's exact
            result (logits move by the rounding; greedy text can differ where two tokens were nearly tied).
        kv_cache: The keys and values kept for the context, on the torch-free path (a GGUF file, --engine auto):
            float16 halves their memory (the embedded model: 46 KB per token of context in float32) and what a
            decoded token's attention reads (long prompts decode faster: 0.80x the time per token at 4,000
            tokens), as llama.cpp's default cache does; logits move by the rounding (~5e-4 of their scale).
        draft: Speculative decoding (same output, fewer passes of the model): a smaller model with the same
            tokenizer (a directory, .gguf or embedded name), prompt-lookup (drafts copied from where the text's
            ending occurred before in the prompt or the text so far; prompt-lookup:N compares up to N tokens,
            default 8), or layers:N (the model's own first N blocks).
        gamma: Speculative decoding: the most tokens drafted per pass of the model (prompt lookup drafts fewer
            after a short match, and on the native path checks only as many as its measured pass times and
            acceptance say will pay). Default: 8 for prompt lookup with --int8_activations, whose extra rows
            cost little (as fast or faster than 4 on every prompt of bench/speculative.py), else 4.
        draft_adapter: An adapter for the draft model (--draft PATH), e.g. the draft's own fine-tune for the task
            of --adapter: the closer the draft's picks are to the model's, the more of them are accepted.
        lookup_history: With --draft prompt-lookup: a text file of the model's earlier answers (created when
            missing; its last 200,000 characters are read), which prompt lookup also drafts from where the text
            has no match of its own; this answer is appended to it. A model repeats its own idioms across
            similar requests: on HumanEval completions 1.44x -> 1.60x plain decoding (bench/RESULTS.md).
        rope_scaling: Another RoPE scaling for a longer context, TYPE:FACTOR with linear, dynamic or yarn (e.g.
            yarn:4: four times the trained length), or none; what changed is printed to stderr.
        rmt: A `mighty finetune rmt` run directory: the prompt is read segment by segment into its memory and the
            reply decoded after it (its LoRA adapter applied to --model).
        attention_sinks: SIZE[:SINKS]: keep only the first SINKS tokens (default 4) and the latest, SIZE in all
            (StreamingLLM), positions counted within that cache: memory stays constant and text may run past the
            model's context. Measured in bench/sinks.py: without the sinks such a window loses the text.
        image: An image file (PNG, JPEG, WebP) for a vision-language model (a LLaVA directory or a `mighty finetune
            vlm` model); repeat for several. The prompt marks each with <image> (e.g. "USER: <image>\\nWhat is
            this? ASSISTANT:"); a prompt without one gets it in front.
        engine: auto: a GGUF file whose every block the native kernels run (the embedded model) decodes without
            loading PyTorch, which starts 2-3 s sooner in a fresh process (mightylm/lite.py; with greedy decoding
            the same tokens; a --seed samples other text than torch's random stream does); anything else, or any
            option that needs the model in torch (--adapter, --draft, --rope_scaling, ...), loads through
            torch. torch: always through PyTorch.
        device: cpu, or cuda (cuda:N) for an NVIDIA GPU: the weights are dequantized to --dtype (bfloat16 is the
            fast one there) and every decoded token is one CUDA graph replay.
        compile: With --device cuda: compile the decode step's block with torch.compile (inductor fuses its small
            kernels) before the graph is captured: a faster step for seconds of compiling at the start, worth it for
            long generations. Needs Triton (part of PyTorch's CUDA builds).
    """
    from mightylm.streaming import Sampling, Timings, stream_text_from

    settings = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop=tuple(stop or ()), attention_sinks=_sinks(attention_sinks))
    _check_lookup_history(lookup_history, draft)
    gamma = _gamma(gamma, draft, int8_activations)
    lite = _lite(model, engine, int8_activations, kv_cache, adapter, _needs_torch(draft, gamma), rope_scaling, rmt,
                 attention_sinks, image, dtype != "float32", not blocks, device != "cpu", compile)
    if rmt and (adapter or draft):
        from mightylm.errors import UsageError

        raise UsageError("--rmt brings its own adapter and decodes segment by segment: use it without --adapter "
                         "and --draft")
    if rmt:
        from pathlib import Path

        adapter = rmt if (Path(rmt) / "adapter_config.json").is_file() else None
    vision = None if lite else _vision_model(model, image, dtype, adapter=adapter, draft=draft,
                                             lookup_history=lookup_history, rmt=rmt, sinks=attention_sinks,
                                             rope_scaling=rope_scaling, device=device != "cpu", compile=compile)
    if lite:
        m, tokenizer, source = lite
        source, spec_stats = _lite_speculative(m, source, draft, gamma, _read_history(lookup_history, tokenizer))
    elif vision:
        from mightylm.multimodal.generate import image_tokens, prompt_ids

        vlm, tokenizer, images = vision
        m, spec_stats = vlm.language, None
        ids = prompt_ids(vlm, tokenizer, prompt, len(images), chat=chat)
        source = lambda ids, s: image_tokens(vlm, ids, s, images)  # noqa: E731
        prompt = ids
    else:
        from mightylm.generate import load_for_generation, stream_tokens

        m, tokenizer = load_for_generation(model, dtype, adapter, keep_blocks=blocks, rope_scaling=rope_scaling,
                                           int8_activations=int8_activations, device=device,
                                           compile_blocks=compile)
        history = _read_history(lookup_history, tokenizer)
        source, spec_stats = _speculative(m, draft, gamma, dtype, draft_adapter, device, history)
        source = source or (lambda ids, s: stream_tokens(m, ids, s))
    if rmt:
        from mightylm.rmt import generate_rmt, load_rmt

        wrapped = load_rmt(m, rmt, apply_adapter=False)
        source = lambda ids, s: generate_rmt(wrapped, ids, s)  # noqa: E731
    if isinstance(prompt, list):
        ids = prompt
    else:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
    timings, answer = Timings(), ""
    for piece in stream_text_from(source, tokenizer, ids, settings, timings):
        answer += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _remember(lookup_history, answer)
    if stats:
        print(timings.report(), file=sys.stderr)
        if spec_stats is not None:
            print(spec_stats.report(), file=sys.stderr)


def _lite(model: str, engine: str, int8_activations: bool, kv_cache: str, *needs_torch):
    """(LiteModel, tokenizer, its token source for stream_text_from) where `mighty generate|chat` decode `model`
    through mightylm.lite (no torch): --engine auto, no option that needs the model in torch (`needs_torch`, each
    truthy when given) and a file lite.py can run (load_lite prints why not); else None, or an error where
    --kv_cache asks for a cache only lite keeps."""
    from mightylm.errors import UsageError

    loaded = None
    if engine == "auto" and not any(needs_torch):
        from mightylm.lite import load_lite

        loaded = load_lite(model, int8_activations=int8_activations, kv_cache=kv_cache)
    if loaded is None and kv_cache != "float32":
        raise UsageError(f"--kv_cache {kv_cache} is kept on the torch-free path only (a GGUF file such as the embedded "
                         "model, --engine auto, without --adapter, --draft MODEL, --rope_scaling, --dtype, ...): "
                         "drop it, or the option that needs torch")
    if loaded is None:
        return None
    from mightylm.lite import stream_tokens

    lite, tokenizer = loaded
    return lite, tokenizer, (lambda ids, s: stream_tokens(lite, ids, s))


def _vision_model(model: str, image: list[str] | None, dtype: str, **refused):
    """(vlm, tokenizer, images) when `model` is a vision-language model, else None (refusing --image then)."""
    from mightylm.errors import UsageError
    from mightylm.multimodal.checkpoint import is_vlm

    if not is_vlm(model):
        if image:
            raise UsageError(f"{model} is a text-only model; --image needs a vision-language model (a Hugging Face "
                             "LLaVA directory or a `mighty finetune vlm` run's model directory)")
        return None
    given = [f"--{k}" for k, v in refused.items() if v]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be used with a vision-language model yet")
    from mightylm.multimodal.checkpoint import load_vlm
    from mightylm.multimodal.images import open_image

    images = [open_image(p) for p in image or []]
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    vlm, tokenizer = load_vlm(model, dtype=dtype)
    return vlm, tokenizer, images


def _sinks(spec: str | None) -> tuple[int, int] | None:
    """--attention_sinks SIZE[:SINKS] as (size, sinks)."""
    if spec is None:
        return None
    from mightylm.errors import UsageError

    size, _, sinks = spec.partition(":")
    try:
        size, sinks = int(size), int(sinks or 4)
    except ValueError:
        raise UsageError(f"--attention_sinks {spec!r}: give SIZE or SIZE:SINKS, e.g. 1024:4") from None
    if not 0 <= sinks < size - 1:
        raise UsageError(f"--attention_sinks {spec!r}: the cache needs more slots than sinks + 1")
    return size, sinks


def _speculative(model, draft: str | None, gamma: int, dtype: str, draft_adapter: str | None = None,
                 device: str = "cpu", history=None):
    """(token source for stream_text, its statistics) for --draft, or (None, None) without one; `history`: a
    speculative.History for prompt lookup (--lookup_history)."""
    from mightylm.errors import UsageError

    if draft_adapter and (not draft or draft.startswith(("prompt-lookup", "layers:"))):
        raise UsageError("--draft_adapter applies to a draft model (--draft PATH); a layers:N draft shares the "
                         "model's own weights and adapter, prompt lookup has none")
    if not draft:
        return None, None
    from mightylm.generate import load_for_generation
    from mightylm.speculative import Stats, make_draft, speculative_tokens

    drafter = make_draft(draft, model, load=lambda path: load_for_generation(path, dtype, draft_adapter,
                                                                             log=sys.stderr, device=device)[0])
    if history is not None:
        drafter.history = history
    stats = Stats()
    return (lambda ids, s: speculative_tokens(model, ids, s, drafter, gamma, stats=stats)), stats


def _gamma(gamma: int | None, draft: str | None, int8_activations: bool) -> int:
    """--gamma, or its default: 8 for prompt lookup in int8, whose extra rows cost little (bench/RESULTS.md: as fast
    or faster than 4 on every prompt of bench/speculative.py, up to 1.14x on a summary), else 4 (a float32 row costs
    three int8 ones on an AVX-512 CPU, and there 8 was the same or a little slower; a draft model's tokens cost a
    step of it each)."""
    if gamma is not None:
        return gamma
    return 8 if int8_activations and (draft or "").startswith("prompt-lookup") else 4


def _needs_torch(draft: str | None, gamma: int) -> str | None:
    """The --draft that needs the model in torch (a draft model, layers:N); prompt lookup runs on the lite path,
    whose passes take at most lite.NATIVE_ROWS tokens (a --gamma past that goes through torch, as before)."""
    from mightylm.lite import NATIVE_ROWS

    lookup = (draft or "").startswith("prompt-lookup") and gamma < NATIVE_ROWS
    return None if lookup else draft


def _lite_speculative(lite, source, draft: str | None, gamma: int, history=None, session=None):
    """(token source, its statistics) on the lite path: prompt lookup's speculative decoding for --draft
    prompt-lookup (drafting from `history` too, a lookup.History for --lookup_history; on a chat's lite.Session),
    else `source` as it is and None."""
    if not draft:
        return source, None
    from mightylm.lite import speculative_tokens
    from mightylm.lookup import Stats, parse_lookup

    lookup, stats = parse_lookup(draft, history=history), Stats()
    return (lambda ids, s: speculative_tokens(lite, ids, s, lookup, gamma, stats, session=session)), stats


HISTORY_CHARS = 200_000  # the most of a --lookup_history file read (its end): ~60k tokens, ~40 MB of counts


def _check_lookup_history(path: str | None, draft: str | None) -> None:
    from mightylm.errors import UsageError

    if path is None:
        return
    if not (draft or "").startswith("prompt-lookup"):
        raise UsageError(f"--lookup_history {path} feeds prompt lookup's drafts: add --draft prompt-lookup")
    from pathlib import Path

    if Path(path).is_dir():
        raise UsageError(f"--lookup_history {path} is a directory; give a text file (created when missing)")
    try:  # each answer is appended: find out now, not after the answer, if that cannot be done
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UsageError(f"--lookup_history {path}: cannot append to it ({e.strerror}); give a writable text file "
                         "in an existing directory") from None


def _read_history(path: str | None, tokenizer):
    """The speculative.History of a --lookup_history file (empty when it does not exist yet), or None."""
    if path is None:
        return None
    from pathlib import Path

    from mightylm.lookup import History

    history = History()
    if Path(path).is_file():
        with open(path, "rb") as f:
            f.seek(max(0, Path(path).stat().st_size - 4 * HISTORY_CHARS))
            text = f.read().decode("utf-8", errors="ignore")[-HISTORY_CHARS:]
        for answer in text.split("\n\n\n"):  # answers are kept apart by two empty lines (_remember)
            history.add(tokenizer.encode(answer))
        print(f"lookup history: {history.tokens} tokens from {path}", file=sys.stderr)
    return history


def _remember(path: str | None, answer: str) -> None:
    """Append an answer to the --lookup_history file, apart from the earlier ones."""
    if path is None or not answer.strip():
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(answer.strip("\n") + "\n\n\n")


def chat(
    model: str = DEFAULT_MODEL,
    system: str | None = None,
    max_new_tokens: PositiveInt = 512,
    temperature: NonNegativeFloat = 0.7,
    top_p: Probability | None = 0.9,
    seed: Seed | None = None,
    dtype: DType = "float32",
    adapter: str | None = None,
    stats: bool = False,
    blocks: bool = True,
    int8_activations: bool = False,
    kv_cache: Literal["float32", "float16"] = "float32",
    draft: str | None = None,
    gamma: PositiveInt | None = None,
    draft_adapter: str | None = None,
    lookup_history: str | None = None,
    rope_scaling: str | None = None,
    image: list[str] | None = None,
    engine: Literal["auto", "torch"] = "auto",
    device: str = "cpu",
    compile: bool = False,
) -> None:
    """Chat with a model using its chat template.

    Type a message and press Enter; /reset starts over, /exit (or Ctrl-D) quits. When standard
    input is not a terminal, each line read is one user message and each reply is printed, so
    a conversation can be scripted: printf 'Hi\\nWho are you?\\n' | mighty chat

    The conversation's keys and values stay in the cache from turn to turn (plain decoding, and prompt lookup on
    the torch-free path), so a turn reads only its new tokens, not the whole conversation again (--stats says how
    many came from the cache).

    Args:
        model: A Hugging Face model directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        system: A system message to start the conversation with.
        max_new_tokens: Longest reply, in tokens.
        temperature: Sampling temperature; 0 is greedy.
        top_p: Nucleus sampling threshold.
        seed: Random seed for sampling.
        dtype: Weight and activation precision.
        adapter: An adapter directory to apply, unmerged: LoRA, prompt tuning or P-tuning (ours or PEFT's),
            or LLaMA-Adapter (ours).
        stats: After each reply, print its prefill and decoding speed (tokens/s) to stderr, and how many of the
            prompt's tokens were already in the cache (the conversation's keys and values are kept between turns:
            a turn reads its new tokens only; not with a draft model or images).
        blocks: Keep a GGUF file's Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q4_K / Q6_K / F16 / BF16 projection and head weights
            as stored (see `mighty generate --help`); false dequantizes them at load.
        int8_activations: With --blocks: activations rounded to 8 bits per block (see `mighty generate --help`).
        kv_cache: float16 halves the conversation's cache on the torch-free path (see `mighty generate --help`).
        draft: Speculative decoding: a smaller model with the same tokenizer, prompt-lookup, or layers:N (see
            `mighty generate --help`).
        gamma: Speculative decoding: the most tokens drafted per pass of the model (default: 8 for prompt lookup
            with --int8_activations, else 4; see `mighty generate --help`).
        draft_adapter: An adapter for the draft model (--draft PATH), e.g. the draft's own fine-tune for the task
            of --adapter: the closer the draft's picks are to the model's, the more of them are accepted.
        lookup_history: With --draft prompt-lookup: a text file of the model's earlier answers that prompt lookup
            also drafts from (see `mighty generate --help`); each reply is appended to it and counted at once.
        rope_scaling: Another RoPE scaling for a longer context, TYPE:FACTOR with linear, dynamic or yarn (e.g.
            yarn:4: four times the trained length), or none; what changed is printed to stderr.
        image: An image file for a vision-language model, attached to the first message (repeat for several);
            during the chat, `/image FILE` attaches one to the next message.
        engine: auto: a GGUF file whose every block the native kernels run starts without PyTorch (see `mighty
            generate --help`); torch: always through PyTorch.
        device: cpu, or cuda (cuda:N) for an NVIDIA GPU (see `mighty generate --help`).
        compile: With --device cuda: compile the decode step's block with torch.compile (see `mighty generate
            --help`); the first longer cache of the conversation compiles once more, for any length.
    """
    from mightylm.errors import UsageError
    from mightylm.streaming import Sampling, Timings, stream_text_from

    settings = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    _check_lookup_history(lookup_history, draft)
    gamma = _gamma(gamma, draft, int8_activations)
    lite = _lite(model, engine, int8_activations, kv_cache, adapter, _needs_torch(draft, gamma), rope_scaling, image,
                 dtype != "float32", not blocks, device != "cpu", compile)
    vision = None if lite else _vision_model(model, image, dtype, adapter=adapter, draft=draft,
                                             lookup_history=lookup_history, rope_scaling=rope_scaling,
                                             device=device != "cpu", compile=compile)
    session = None
    if lite:
        from mightylm.lite import Session, stream_tokens

        m, tokenizer, _ = lite
        lookup, prefix_len, session = _read_history(lookup_history, tokenizer), 0, Session(m)
        source = lambda ids, s: stream_tokens(m, ids, s, session=session)  # noqa: E731
        source, spec_stats = _lite_speculative(m, source, draft, gamma, lookup, session)
    elif vision:
        from mightylm.multimodal.generate import image_tokens, prompt_ids
        from mightylm.multimodal.images import ImageError, open_image
        from mightylm.multimodal.vlm import IMAGE_TOKEN

        vlm, tokenizer, pending = vision
        m, spec_stats = vlm.language, None
    else:
        from mightylm.generate import load_for_generation, stream_tokens

        m, tokenizer = load_for_generation(model, dtype, adapter, keep_blocks=blocks, rope_scaling=rope_scaling,
                                           int8_activations=int8_activations, device=device,
                                           compile_blocks=compile)
        lookup = _read_history(lookup_history, tokenizer)
        source, spec_stats = _speculative(m, draft, gamma, dtype, draft_adapter, device, lookup)
        if source is None:  # plain decoding keeps the conversation's cache (generate.Session)
            from mightylm.generate import Session

            session = Session(m)
            source = lambda ids, s: stream_tokens(m, ids, s, session=session)  # noqa: E731
    if not lite:
        prefix_len = m.prefix_len
    seen = []  # the images of the conversation so far, in order (a vision-language model)
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    if interactive:
        print("chat with the model; /reset to start over, /exit to quit", file=sys.stderr)
    number = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        raw = sys.stdin.buffer.readline()
        if not raw:
            break
        number += 1
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            if not interactive:
                raise UsageError(f"standard input, line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                 f"column {e.start + 1}); convert it first (e.g. iconv -t UTF-8)") from None
            print(f"(that line is not valid UTF-8 at column {e.start + 1}; type it again)", file=sys.stderr)
            continue
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history, seen = list(start), []
            continue
        if text.startswith("/image"):
            if not vision:
                print("(this model reads text only; /image needs a vision-language model)", file=sys.stderr)
                continue
            try:
                pending.append(open_image(text.removeprefix("/image").strip()))
            except ImageError as e:
                print(f"({e})", file=sys.stderr)
            continue
        if not interactive:
            print(f"you> {text}")
        if vision and pending:
            text = (IMAGE_TOKEN + "\n") * len(pending) * (vlm.mode == "llava") + text
            seen, pending = seen + pending, []
        history.append({"role": "user", "content": text})
        encode = (lambda h: prompt_ids(vlm, tokenizer, "", len(seen), messages=list(h))) if vision \
            else tokenizer.encode_chat
        ids = encode(history)
        # Forget the oldest turns (keeping any system message) until the reply fits in the context.
        while len(ids) + max_new_tokens + prefix_len > m.config.max_seq_len and len(history) > len(start) + 1:
            if vision:  # the forgotten turns' images go with them
                gone = sum(h["content"].count(IMAGE_TOKEN) for h in history[len(start):len(start) + 2])
                seen = seen[gone:]
            del history[len(start):len(start) + 2]
            ids = encode(history)
        if vision:
            source = lambda ids, s, images=list(seen): image_tokens(vlm, ids, s, images)  # noqa: E731
        print("assistant> ", end="", flush=True)
        reply, timings = "", Timings()
        for piece in stream_text_from(source, tokenizer, ids, settings, timings):
            reply += piece
            print(piece, end="", flush=True)
        print()
        if stats:
            if session is not None:  # the prefill read the tokens after those the cache held
                timings.prompt_tokens -= session.reused
            print(timings.report(), file=sys.stderr)
            if session is not None:
                print(f"(the first {session.reused} of the {len(ids)} prompt tokens were in the cache from the turns "
                      "before)", file=sys.stderr)
            if spec_stats is not None:
                print(spec_stats.report(), file=sys.stderr)
        history.append({"role": "assistant", "content": reply})
        if lookup_history:
            lookup.add(tokenizer.encode(reply))
            _remember(lookup_history, reply)


def merge(model: str, adapter: str, out: str, requantize: bool = False, overwrite: bool = False) -> None:
    """Merge a LoRA adapter into its base model and write a full checkpoint transformers loads.

    A QLoRA adapter (trained over an NF4 base) is merged into a dequantized float copy of that base.
    With --requantize, the merged model is quantized again the same way and written quantized; the
    change this causes in the outputs is measured and printed (re-quantizing moves every weight).

    Args:
        model: The base model: a Hugging Face directory, a .gguf file, or an embedded model name.
        adapter: The LoRA adapter directory (ours or PEFT's, LoRA or QLoRA).
        out: Where to write the merged checkpoint: a new or empty directory (written under a temporary name and
            renamed when complete).
        requantize: For a QLoRA adapter: quantize the merged model again and write it quantized.
        overwrite: Replace --out if it already holds something (never when it is the model or the adapter).
    """
    import mightylm
    from mightylm.adapters.merge import check_mergeable, merge_into_base
    from mightylm.outputs import check_output, written_into

    target = check_output(out, inputs=[model, adapter], overwrite=overwrite)
    check_mergeable(adapter)  # before the model is loaded
    base, tokenizer = mightylm.load(model)
    n = merge_into_base(base, tokenizer, adapter, requantize=requantize)
    with written_into(target) as tmp:
        mightylm.save(base, tokenizer, tmp)
    print(f"merged {n} LoRA layers of {adapter} into {model}; wrote {target}\n"
          f"use it: mighty generate --model {target} --prompt \"...\"")


GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]


def export(
    out: str,
    model: str = DEFAULT_MODEL,
    format: Literal["gguf", "gguf-lora", "hf"] = "gguf",
    type: GGUFType = "f16",
    head_type: GGUFType | None = None,
    adapter: str | None = None,
    check: bool = True,
    overwrite: bool = False,
) -> None:
    """Export a model to GGUF for llama.cpp, Ollama and LM Studio, a LoRA adapter to llama.cpp's adapter GGUF.

    One GGUF file holds the weights, the tokenizer and the chat template; --format hf writes a Hugging Face
    directory instead (so one verb converts either way, GGUF to safetensors too). The GGUF quantizers are byte for byte those of the `gguf` package (llama.cpp's reference ones). A model
    quantized our way (int8, int4, NF4) is dequantized and re-quantized, and the added error is printed. With
    --check (the default) the written file is read back and its outputs on a probe text compared with the
    model's.

    Examples:
        mighty export --model runs/merged --type q8_0 --out model.q8_0.gguf
        mighty export --model smollm2-135m-instruct --adapter runs/lora --type q4_1 --out tuned.gguf
        mighty export --model smollm2-135m-instruct --adapter runs/lora --format gguf-lora --out lora.gguf
        llama-cli -m tuned.gguf -p "Hello"      (or: mighty generate --model tuned.gguf --prompt "Hello")

    Args:
        out: The file to write (.gguf), or the directory for --format hf; written under a temporary name and
            renamed when complete.
        model: The model (or, for gguf-lora, the adapter's base): a Hugging Face directory, a .gguf file or an
            embedded model name.
        format: gguf (a whole model), gguf-lora (the LoRA in --adapter, for llama.cpp's --lora), or hf.
        type: The GGUF type of the weight matrices: f32, f16, bf16, q8_0, q4_0 or q4_1 (gguf-lora: f32, f16,
            bf16 or q8_0). Norms and other vectors stay f32; matrices whose rows are not a multiple of 32 take f16.
        head_type: The type of the token embedding and the head (default: q8_0 for q4_0/q4_1, as llama.cpp's
            quantizer keeps them at higher precision, else --type).
        adapter: A LoRA adapter directory: merged into the model before writing (gguf, hf), or the adapter to
            convert (gguf-lora).
        check: Read the written file back and print how far its outputs are from the model's.
        overwrite: Replace --out if it exists (never when it is the model or the adapter).
    """
    from pathlib import Path

    import torch

    import mightylm
    from mightylm.compress.probe import output_change, probe_ids
    from mightylm.errors import UsageError
    from mightylm.outputs import check_output, written_into

    target = check_output(out, inputs=[model, adapter], overwrite=overwrite)
    if format != "hf" and (target.suffix != ".gguf" or target.is_dir()):
        raise UsageError(f"--out {out}: a GGUF file is written to a file name ending in .gguf (readers find it by it)")
    if format == "gguf-lora":
        from mightylm.adapters import load_adapter
        from mightylm.adapters.gguf import export_gguf_lora

        if adapter is None:
            raise UsageError("--format gguf-lora writes the LoRA adapter given by --adapter DIR; none was given")
        base, tokenizer = mightylm.load(model)
        report = export_gguf_lora(base, adapter, target, kind=type)
        print(report.summary())
        if check:
            probe = probe_ids(tokenizer)
            with torch.no_grad():
                load_adapter(base, adapter)
                reference = base(probe)
                written, _ = mightylm.load(model)
                load_adapter(written, target)
                print(f"read back onto {model}: {output_change(written(probe), reference)} (against the adapter as "
                      "trained)")
        print(f"use it: llama-cli -m BASE.gguf --lora {target}   (or: mighty generate --model {model} "
              f"--adapter {target})")
        return
    base, tokenizer = mightylm.load(model)
    probe = probe_ids(tokenizer)
    unadapted = None
    if adapter is not None:
        from mightylm.adapters.merge import check_mergeable, merge_into_base

        check_mergeable(adapter)
        with torch.no_grad():
            unadapted = base(probe)
        n = merge_into_base(base, tokenizer, adapter)
        print(f"merged {n} LoRA layers of {adapter}")
    if format == "hf":
        with written_into(target) as tmp:
            mightylm.save(base, tokenizer, tmp)
        print(f"wrote {target}\nuse it: mighty generate --model {target} --prompt \"...\"")
        return
    from mightylm.checkpoint.gguf_export import export_gguf

    with torch.no_grad():
        reference = base(probe)
    report = export_gguf(base, tokenizer, target, kind=type, head_kind=head_type, name=Path(str(model)).name)
    print(report.summary())
    if check:
        written, _ = mightylm.load(target)
        with torch.no_grad():
            out = written(probe)
        print(f"read back: {output_change(out, reference)} (against the model written)")
        if unadapted is not None and (out - unadapted).norm() < (out - reference).norm():
            print(f"warning: the written file is closer to the model without the adapter than with it: quantizing to "
                  f"{type} erased most of the adapter's update (a base already stored in that format keeps its grid, "
                  "and a small update rounds back onto it). Export the adapter on its own (--format gguf-lora, "
                  "applied with llama-cli --lora) or choose another --type", file=sys.stderr)
    print(f"use it: llama-cli -m {target}   (or: mighty generate --model {target} --prompt \"...\")")


def quantize(
    model: str,
    method: Literal["nf4", "int8", "int4", "smoothquant"],
    out: str,
    calib: str | None = None,
    calib_windows: PositiveInt = 8,
    block_size: PositiveInt = 64,
    double_quant: bool = True,
    group_size: PositiveInt = 64,
    alpha: ClosedUnitInterval = 0.5,
    per_token: bool = True,
    head: bool = False,
    overwrite: bool = False,
) -> None:
    """Quantize a model's linear layers and write a checkpoint that `mighty generate` and `chat` load.

    The method and its settings are recorded in the checkpoint's metadata; loading rebuilds the same
    modules. The embedding and the LM head stay in float. Prints the size before and after and how
    far the outputs moved on a probe text. Nothing is left in --out if anything fails.

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        method: nf4 (4.13 bits), int8 (weight-only, per channel), int4 (weight-only, per group), or
            smoothquant (W8A8 after migrating activation outliers; needs --calib).
        out: The directory to write: a new or empty one (written under a temporary name and renamed when complete).
        calib: Text for SmoothQuant's calibration: a text file, a directory of them, JSONL with "text",
            or the embedded corpus name shakespeare.
        calib_windows: Calibration windows of 256 tokens.
        block_size: nf4: weights per absmax block.
        double_quant: nf4: also quantize the absmax constants (8-bit, blocks of 256).
        group_size: int4: weights per (scale, zero) group; must divide every layer's inputs.
        alpha: smoothquant: migration strength (0: none, 1: all onto the weights).
        per_token: smoothquant: one activation scale per token (else one per tensor).
        head: Quantize the LM head too (nf4/int8/int4). A head tied to the embedding becomes its own
            quantized copy; decoding then reads it instead of the float table (faster, slightly lossier).
        overwrite: Replace --out if it already holds something (never when it is the model or the calibration text).
    """
    import mightylm
    from mightylm.compress.convert import check_request, quantize_model
    from mightylm.outputs import check_output, written_into

    check_request(method, calib=calib, head=head)
    target = check_output(out, inputs=[model, calib], overwrite=overwrite)
    net, tokenizer = mightylm.load(model)
    done = quantize_model(net, tokenizer, method, calib=calib, calib_windows=calib_windows, head=head,
                          block_size=block_size, double_quant=double_quant, group_size=group_size, alpha=alpha,
                          per_token=per_token)
    with written_into(target) as tmp:
        mightylm.save(net, tokenizer, tmp)
    before, after = done["bytes_before"], done["bytes_after"]
    print(f"{method}: {len(done['modules'])} linear layers; {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
          f"({before / after:.2f}x smaller); outputs on a probe text: {done['change']}; wrote {target}")


def prune(
    model: str,
    out: str,
    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda",
    sparsity: Fraction | None = None,
    pattern: str | None = None,
    structured: bool = False,
    ffn: ClosedUnitInterval = 1.0,
    heads: ClosedUnitInterval = 1.0,
    dim: ClosedUnitInterval = 1.0,
    layers: PositiveInt | None = None,
    calib: str = "shakespeare",
    calib_windows: PositiveInt = 16,
    overwrite: bool = False,
) -> None:
    """Prune a model and write an ordinary checkpoint (transformers loads it; what was pruned is recorded with it).

    Unstructured or N:M pruning zeroes weights of the projections (--sparsity 0.5, or --pattern 2:4): magnitude
    needs nothing else; wanda and sparsegpt weigh each weight by its inputs on --calib text, block by block. A 2:4
    model decodes through a kernel that reads only its kept weights. Fine-tuning a pruned model
    (`mighty finetune full`, `mighty distill`) keeps its zeros.
    Structured pruning (--structured true, Minitron-style) removes whole FFN neurons, key/value head groups,
    embedding channels and blocks, ranked by their activations on --calib: the result is a smaller config
    that decodes faster. Train it back with `mighty distill --teacher <the original>`.
    Prints the parameters, the sparsity and how far the outputs moved on a probe text.

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        out: The directory to write: a new or empty one (written under a temporary name and renamed when complete).
        method: magnitude, wanda (Sun et al. 2023) or sparsegpt (Frantar & Alistarh 2023), for unstructured / N:M.
        sparsity: The fraction of each projection's weights to zero (0 up to 1).
        pattern: N:M instead of a sparsity: zero N of every M consecutive inputs (2:4, 4:8).
        structured: Remove whole units instead (--ffn, --heads, --dim, --layers).
        ffn: structured: the fraction of FFN neurons kept in each block.
        heads: structured: the fraction of key/value head groups kept in each block (their query heads go with them).
        dim: structured: the fraction of embedding channels kept.
        layers: structured: the number of blocks kept (the least influential go; default all).
        calib: Calibration text: a text file, a directory of them, JSONL with "text", or the embedded corpus
            shakespeare.
        calib_windows: Calibration windows of 256 tokens.
        overwrite: Replace --out if it already holds something (never when it is the model or the calibration text).
    """
    import torch

    import mightylm
    from mightylm.compress.calibration import calibration_batches
    from mightylm.compress.probe import output_change, probe_ids
    from mightylm.compress.prune import check_request, parse_pattern, prune_, sparsity_of
    from mightylm.errors import UsageError
    from mightylm.outputs import check_output, written_into

    n_m = parse_pattern(pattern)
    if structured:
        if sparsity is not None or pattern is not None:
            raise UsageError("--structured removes whole units (--ffn, --heads, --dim, --layers); --sparsity and "
                             "--pattern are for unstructured pruning: use one or the other")
    else:
        check_request(method, sparsity, n_m)
    target = check_output(out, inputs=[model, calib], overwrite=overwrite)
    net, tokenizer = mightylm.load(model)
    probe = probe_ids(tokenizer)
    with torch.no_grad():
        reference = net(probe)
    before = net.config.n_params
    batches = None if method == "magnitude" and not structured else calibration_batches(
        calib, tokenizer, calib_windows, method="structured pruning" if structured else method)
    if structured:
        from mightylm.compress.structured import measure, prune_structured

        net = prune_structured(net, measure(net, batches), ffn=ffn, heads=heads, dim=dim, layers=layers)
        c = net.config
        what = (f"{c.n_layers} layers, dim {c.dim}, {c.n_heads} heads ({c.n_kv_heads} key/value), ffn {c.ffn_dim}; "
                f"{before / 1e6:.1f}M -> {c.n_params / 1e6:.1f}M parameters")
    else:
        names = prune_(net, method, sparsity=sparsity, pattern=n_m, batches=batches, progress=True)
        what = f"{len(names)} projections {sparsity_of(net, names):.1%} zero"
    with torch.no_grad():
        change = output_change(net(probe), reference)
    with written_into(target) as tmp:
        mightylm.save(net, tokenizer, tmp)
    print(f"{'structured' if structured else method}: {what}; outputs on a probe text: {change}; wrote {target}")


def distill_data(
    teacher: str,
    prompts: str,
    out: str,
    style: Literal["step_by_step", "recall_then_answer", "direct", "mixed"] = "step_by_step",
    max_new_tokens: PositiveInt = 256,
    temperature: NonNegativeFloat = 0.0,
    seed: Seed = 0,
    batch_size: PositiveInt = 8,
    overwrite: bool = False,
) -> None:
    """Have a teacher answer prompts under a reasoning instruction and write chat JSONL without it (Orca 2).

    Sequence-level distillation with explanation data: the teacher is told how to answer (step by step, recall
    then answer, or directly) in a system message; the written conversations keep only the user's prompt and the
    teacher's answer ("prompt erasure"), so a student fine-tuned on them (`mighty finetune full|lora --data OUT`)
    learns the strategy without being told. Works across tokenizers (the student sees text only).

    Args:
        teacher: The teacher: a Hugging Face directory, a .gguf file, or an embedded model name (with a chat template).
        prompts: JSONL ({"prompt"}, {"instruction", "input"?} or {"messages"}) or a text file, one prompt per line.
        out: The chat JSONL to write (a new file; written under a temporary name and renamed when complete).
        style: The system instruction: step_by_step, recall_then_answer, direct, or mixed (cycles through them).
        max_new_tokens: Longest answer, in tokens.
        temperature: Sampling temperature of the teacher; 0 is greedy.
        seed: Random seed for sampling.
        batch_size: Prompts answered together.
        overwrite: Replace --out if it exists.
    """
    import os
    from pathlib import Path

    from mightylm.compress.explanations import explanation_data, read_prompts, write_jsonl
    from mightylm.errors import UsageError
    from mightylm.generate import load_for_generation

    target = Path(out)
    if target.exists() and not overwrite:
        raise UsageError(f"{target} exists; pass --overwrite true to replace it, or choose another --out")
    if target.resolve() == Path(prompts).resolve():
        raise UsageError(f"--out {target} is the prompts file; write the answers elsewhere")
    questions = read_prompts(prompts)
    model, tokenizer = load_for_generation(teacher)
    if not tokenizer.chat_template:
        raise UsageError(f"{teacher}: the teacher needs a chat template (its system message carries the instruction)")
    tmp = target.with_name(target.name + ".tmp")
    try:
        n = write_jsonl(explanation_data(model, tokenizer, questions, style=style, max_new_tokens=max_new_tokens,
                                         temperature=temperature, seed=seed, batch_size=batch_size), tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {n} conversations ({style}; the system instruction erased) to {target}\n"
          f"train a student on them: mighty finetune full --model STUDENT --data {target}")


def upcycle(model: str, out: str, experts: PositiveInt = 8, top_k: PositiveInt = 2, overwrite: bool = False) -> None:
    """Turn a dense model into a sparse mixture of experts (sparse upcycling, Komatsuzaki et al. 2023).

    Every feed-forward becomes --experts copies of itself behind a fresh router that sends each token to --top-k
    of them, with the chosen weights renormalised: the written model computes what the dense one did (same
    logits) until it is trained, e.g. with `mighty finetune full --model DIR` (the router losses are added to
    the loss while training: per-layer balancing, and the experts' utilisation is logged).
    A Llama or Mistral model is written as Mixtral, a Qwen2 model as Qwen2-MoE, which transformers loads.

    Args:
        model: A dense Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        out: The directory to write: a new or empty one (written under a temporary name and renamed when complete).
        experts: Experts per layer (each a copy of the dense feed-forward: the feed-forward weights grow this much).
        top_k: Experts each token is sent to (at most --experts).
        overwrite: Replace --out if it already holds something (never when it is the model).
    """
    import mightylm
    from mightylm.errors import UsageError
    from mightylm.model import MLP
    from mightylm.moe import upcycle_
    from mightylm.outputs import check_output, written_into

    if top_k > experts:
        raise UsageError(f"--top_k {top_k} is more than --experts {experts}: each token can go to at most every expert")
    target = check_output(out, inputs=[model], overwrite=overwrite)
    net, tokenizer = mightylm.load(model)
    dense = net.config.n_params
    try:
        upcycle_(net, n_experts=experts, top_k=top_k, expert=MLP)
    except ValueError as e:
        raise UsageError(f"{model}: {e}") from None
    with written_into(target) as tmp:
        mightylm.save(net, tokenizer, tmp)
    c = net.config
    print(f"{c.arch}: {c.n_layers} layers x {experts} experts, top-{top_k}; {dense / 1e6:.0f}M -> "
          f"{c.n_params / 1e6:.0f}M parameters, {c.active_params / 1e6:.0f}M active per token; wrote {target}")


def report(run_dir: str) -> None:
    """Write report.png and report.md for a training run directory and print the summary.

    Args:
        run_dir: A directory written by `mighty pretrain` or `mighty finetune`.
    """
    from mightylm.report import write_report

    print(write_report(run_dir).read_text())


def env() -> None:
    """Print what this machine offers mightylm: versions, the CPU and its flags, the native kernels' instruction
    set (chosen at run time from the flags; MIGHTYLM_ISA=avx2 forces the baseline), threads, bf16, GPU.
    Benchmarks quote this; compare figures only from the same machine."""
    import importlib.metadata
    import os
    import platform

    import torch

    from mightylm import kernels

    flags = kernels.cpu_flags()
    model = next((line.partition(":")[2].strip() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    shown = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    lib = kernels.gemv_library()
    rows = [
        ("mightylm", importlib.metadata.version("mightylm")),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("CPU", f"{model}, {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads"),
        ("CPU flags", " ".join(shown) or "(none read)"),
        ("kernels", "unavailable: PyTorch is used (no compiler, no AVX2/FMA, or MIGHTYLM_NO_KERNELS=1)" if lib is None
         else f"{kernels.kernel_isa()} (this CPU can run: {', '.join(kernels.available_isas())})"),
        ("bf16", "native (avx512_bf16 / amx_bf16)" if flags & {"avx512_bf16", "amx_bf16"}
         else "emulated (no avx512_bf16 or amx_bf16): --train.bf16 is slow here"),
        ("GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CUDA not available)"),
        ("cache", os.environ.get("MIGHTYLM_CACHE", os.path.expanduser("~/.cache/mightylm"))),
    ]
    for name, value in rows:
        print(f"{name + ':':11s}{value}")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _verbs() -> dict:
    from mightylm import recipes as r
    from mightylm.evaluate.commands import VERBS as evaluate
    from mightylm.serve.command import serve
    from mightylm.serve.registry_commands import VERBS as registry

    finetune = {"_help": "Fine-tune a model on instruction or chat JSONL: every weight (full), or an adapter "
                         "(lora, qlora, prompt, ptuning, adapter), or a recurrent memory with LoRA (rmt); or "
                         "give a model sight (vlm).",
                "full": r.finetune_full, "lora": r.finetune_lora, "qlora": r.finetune_qlora, "prompt": r.finetune_prompt,
                "ptuning": r.finetune_ptuning, "adapter": r.finetune_adapter, "rmt": r.finetune_rmt,
                "vlm": r.finetune_vlm}
    evaluate = {"_help": "Evaluate a model (local or behind an OpenAI-compatible endpoint) on a task: perplexity, "
                         "humaneval, arithmetic, corr2cause, choice, emergence, longctx, bias.", **evaluate}
    return {"generate": generate, "chat": chat, "pretrain": r.pretrain, "finetune": finetune, "merge": merge,
            "export": export, "quantize": quantize, "prune": prune, "distill": r.distill, "distill-data": distill_data,
            "upcycle": upcycle, "report": report, "eval": evaluate, "serve": serve, "env": env, **registry}


def _group_fields(verb) -> dict[str, str]:
    """The options of the verb's groups (dataclass parameters: --lora.r, --train.lr) that may be given without
    the group's name (--r, --lr): those whose name no parameter and no other group of the verb uses."""
    import dataclasses
    import inspect
    import typing

    own = set(inspect.signature(verb).parameters)
    owners: dict[str, list[str]] = {}
    for name, hint in typing.get_type_hints(verb).items():
        if name in own and dataclasses.is_dataclass(hint):
            for f in dataclasses.fields(hint):
                owners.setdefault(f.name, []).append(f"{name}.{f.name}")
    return {field: full[0] for field, full in owners.items() if len(full) == 1 and field not in own}


def _list_options(verb) -> set[str]:
    """The list-valued options of a verb, its groups' included (they may be repeated on the command line)."""
    import dataclasses
    import typing

    found = set()
    for name, hint in typing.get_type_hints(verb).items():
        if dataclasses.is_dataclass(hint):
            found |= {f"{name}.{f.name}" for f in dataclasses.fields(hint) if "list[" in str(f.type)}
        elif "list[" in str(hint):
            found.add(name)
    return found


def _underscore_options(argv: list[str]) -> list[str]:
    """Accept --max-new-tokens as well as jsonargparse's --max_new_tokens; a group's option without its group's
    name (--r for --lora.r) where that is unambiguous; list options repeated (`--adapter a=x --adapter b=y`)
    as well as given as a JSON list: jsonargparse appends only with `--name+ value`; and a verb's yes/no option
    alone (`--stats` for `--stats true`)."""
    verb = _verb_of(argv)[1]
    grouped = {} if isinstance(verb, dict) else _group_fields(verb)
    repeatable = set() if isinstance(verb, dict) else _list_options(verb)
    flags = set() if isinstance(verb, dict) else _bool_options(verb)
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            name = grouped.get(name, name)
            given = value if eq else (argv[i + 1] if i + 1 < len(argv) else "[")
            if name in repeatable and not given.lstrip().startswith("["):
                name += "+"
            arg = "--" + name + eq + value
            if name in flags and not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                out += [arg, "true"]  # a yes/no option given alone (--stats) means yes
                continue
        out.append(arg)
    return out


def _bool_options(verb) -> set[str]:
    """The verb's own yes/no parameters (annotated bool), which may be given without a value."""
    import inspect

    return {name for name, p in inspect.signature(verb).parameters.items() if p.annotation in (bool, "bool")}


def _verb_of(argv: list[str]) -> tuple[list[str], object]:
    """The verb words at the start of `argv` (`finetune lora`), as far as they name verbs, and what they name: a
    function, or a dict of verbs when they stop at a group."""
    verb, path = _verbs(), []
    for word in argv:
        if not isinstance(verb, dict) or word not in verb or word.startswith("_"):
            break
        path.append(word)
        verb = verb[word]
    return path, verb


def _usage(path: list[str]) -> str:
    """The usage lines of the verb `path` names (the top level's when it names none)."""
    import contextlib
    import io

    from jsonargparse import auto_cli

    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        auto_cli(_verbs(), args=[*path, "--help"], as_positional=False, prog="mighty")
    return text.getvalue().split("\n\n")[0]


def _check_text(argv: list[str]) -> None:
    """Refuse arguments that are not UTF-8 (Python keeps their bytes as surrogates) before they reach a tokenizer."""
    from mightylm.errors import UsageError

    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as e:
            option = next((a for a in reversed(argv[:i + 1]) if a.startswith("--")), f"argument {i + 1}")
            raise UsageError(f"{option}: not valid UTF-8 text (byte 0x{ord(arg[e.start]) - 0xDC00:02x} at character "
                             f"{e.start}); pass UTF-8 text (e.g. convert it with iconv -t UTF-8)") from None


def _message(e: BaseException) -> str:
    """One line for an error a user can fix: ours say everything; the OS's get the file and the reason."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}" + (f" (writing to {e.filename2})" if e.filename2 else "")
    return str(e)


DESCRIPTION = ("mightylm: small, efficient language models. `mighty VERB --help` explains a verb; `mighty --debug "
               "VERB ...` shows a traceback with an error. A group's option may be given without the group's name "
               "where that is unambiguous (--r for --lora.r, --steps for --train.steps).")


def _overview() -> str:
    """`mighty --help`: the verbs and what each does, from their docstrings, without building every verb's parser
    (jsonargparse's own listing took ~0.45 s of a 0.6 s start)."""
    import inspect
    import textwrap

    lines = ["usage: mighty [--debug] VERB [options]", "", *textwrap.wrap(DESCRIPTION, 100), "", "verbs:"]
    for name, verb in _verbs().items():
        if isinstance(verb, dict):
            text = f"{verb['_help']} (`mighty {name} KIND --help`)"  # each group's help names its kinds
        else:
            text = " ".join((inspect.getdoc(verb) or "").split("\n\n")[0].split())
        lines += textwrap.wrap(text, 100, initial_indent=f"  {name:13s} ", subsequent_indent=" " * 16)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Exit status: 0 done; 2 a user or environment error (one line, no traceback; --debug before
    the verb shows it); 130 or 143 a run stopped by SIGINT or SIGTERM after saving what it had."""
    import argparse
    import signal

    from jsonargparse import auto_cli

    from mightylm.errors import MightyError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1]
    argv = argv[1:] if debug else argv
    if argv and argv[0] in ("pretrain", "finetune", "distill"):
        from mightylm.huge_pages import for_training

        for_training()  # before torch is imported: fewer page faults in every step
    result = None
    try:
        if argv in (["--help"], ["-h"]):
            print(_overview())
            raise SystemExit(0)
        typed, argv = argv, _underscore_options(argv)
        _check_text(argv)
        verbs = _verbs()
        if argv and argv[0] in verbs:  # only the verb asked for: every verb's parser took ~0.5 s of each start
            verbs = {argv[0]: verbs[argv[0]]}
        result = auto_cli(verbs, args=argv, as_positional=False, exit_on_error=False, prog="mighty",
                          description=DESCRIPTION)
    except argparse.ArgumentError as e:
        path = _verb_of(argv)[0]
        message = str(e)
        configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"] + \
                  [a.partition("=")[2] for a in argv if a.startswith("--config=")]
        if configs:  # the YAML parser names its input "<unicode string>": name the recipe file instead
            message = message.replace('"<unicode string>"', configs[-1])
        verb = _verb_of(argv)[1]
        for short, full in ({} if isinstance(verb, dict) else _group_fields(verb)).items():
            if any(a.startswith("--") and a[2:].partition("=")[0].replace("-", "_") == short for a in typed):
                message = message.replace(f'"{full}"', f'"{short}" ({full})')  # named as it was typed
        print(_usage(path), file=sys.stderr)
        print(f"error: {message}\nsee: mighty {' '.join(path + ['--help'])}", file=sys.stderr)
        raise SystemExit(2) from None  # as argparse does for a command line it cannot parse
    except (MightyError, OSError) as e:
        if debug:
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        dist = sys.modules.get("torch.distributed")  # only a run that imported it can have joined a group
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if isinstance(result, dict) and result.get("interrupted"):  # a training run stopped by a signal, saved
        return 128 + int(result.get("signal") or signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
