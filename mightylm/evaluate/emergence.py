"""Emergent abilities under different metrics (Wei et al. 2022; Schaeffer et al. 2023, "Are Emergent
Abilities of Large Language Models a Mirage?").

A family of small models of increasing size is trained from scratch, with the one training loop,
on D-digit arithmetic (`123+456=0579`, one token per character, operands and answers zero-padded to
a fixed width), then each is measured (on problems it trained on by default, see below) with
- exact match: the greedy answer is right in every token (discontinuous: all or nothing);
- per-token accuracy: how many answer tokens the model ranks first given the right prefix;
- token edit distance between the greedy answer and the right one;
- the answer's log-likelihood per token.
Greedy decoding gets the whole answer right exactly when every teacher-forced token is ranked
first, so exact match is close to per-token accuracy to the power of the answer length L when
errors are spread evenly (Schaeffer et al., section 2); the summary reports both.

At this scale whether a model learns carrying within a fixed step budget varies from run to run, so
`seeds` > 1 trains every size several times (same problems, other initialisation and data order) and
reports the means, with every run shown in the figure (bench/RESULTS.md has a 3-seed table).

By default (`recall=True`) every model trains on a fixed set of `train_examples` distinct problems, seen
many times, and is measured on `test_examples` of those same problems: the ability is recalling trained
products, which grows with the parameter count smoothly (capacity), and that is the setting in which the
mirage shows on 2 CPU cores (bench/RESULTS.md, seventh attempt). `recall=False` measures held-out
problems instead, i.e. computing: at this scale that is learned all at once or not at all (addition) or
not at all (3-digit multiplication), so there the continuous metrics jump too (attempts one to six).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mightylm.errors import UsageError
from mightylm.model import IGNORE_INDEX

VOCAB = "0123456789+*=$"  # "$" ends the answer
EOS = VOCAB.index("$")
OPS = {"addition": "+", "multiplication": "*"}


@dataclass
class Family:
    """The models and their training: every size trains on the same data for the same steps."""

    sizes: tuple[str, ...] = ("8x1", "16x2", "24x3", "32x3", "48x3", "64x3", "96x3", "128x3")  # width x layers
    op: str = "multiplication"
    digits: int = 3
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    train_examples: int | None = None  # default: 2,000 distinct problems for recall, 50,000 draws for held-out
    test_examples: int = 500
    seed: int = 0
    seeds: int = 1  # runs per size (initialisation and data order seed, seed+1, ...; the same problems)
    recall: bool = True  # measure on trained problems (train_examples distinct ones) instead of held-out ones

    def __post_init__(self):
        if self.train_examples is None:
            self.train_examples = 2_000 if self.recall else 50_000


def answer_width(op: str, digits: int) -> int:
    return digits + 1 if op == "addition" else 2 * digits


def problem(rng: random.Random, op: str, digits: int) -> tuple[str, str]:
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    result = a + b if op == "addition" else a * b
    return f"{a:0{digits}d}{OPS[op]}{b:0{digits}d}=", f"{result:0{answer_width(op, digits)}d}"


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def datasets(f: Family) -> tuple[list[dict], list[tuple[str, str]]]:
    """Training items (loss on the answer and its end only) and held-out (prompt, answer) pairs."""
    if f.op not in OPS:
        raise UsageError(f"unknown operation {f.op!r}; known: {', '.join(OPS)}")
    distinct = 10 ** (2 * f.digits)
    if f.recall:
        return _recall_datasets(f, distinct)
    if f.test_examples > distinct // 2:  # held-out problems are distinct and never trained on
        raise UsageError(f"{f.test_examples} held-out problems is more than half of the {distinct} distinct "
                         f"{f.digits}-digit problems; lower --test_examples (at most {distinct // 2})")
    rng = random.Random(f"{f.op}:{f.digits}:{f.seed}")
    test = _distinct_problems(rng, f, f.test_examples)
    seen = {prompt for prompt, _ in test}
    train = []
    while len(train) < f.train_examples:
        prompt, answer = problem(rng, f.op, f.digits)
        if prompt in seen:
            continue  # held-out problems never appear in training
        train.append(_item(prompt, answer))
    return train, test


def _recall_datasets(f: Family, distinct: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """`train_examples` distinct problems, each once per epoch, and the first `test_examples` of them."""
    if f.train_examples > distinct // 2:
        raise UsageError(f"--train_examples {f.train_examples} is more than half of the {distinct} distinct "
                         f"{f.digits}-digit problems; recall needs a fixed set well inside them")
    if f.test_examples > f.train_examples:
        raise UsageError(f"--test_examples {f.test_examples} is more than the {f.train_examples} trained problems "
                         f"that recall is measured on")
    pairs = _distinct_problems(random.Random(f"recall:{f.op}:{f.digits}:{f.seed}"), f, f.train_examples)
    return [_item(p, a) for p, a in pairs], pairs[:f.test_examples]


def _distinct_problems(rng: random.Random, f: Family, n: int) -> list[tuple[str, str]]:
    """The first `n` distinct (prompt, answer) pairs that `rng` draws, in the order drawn."""
    problems = {}
    while len(problems) < n:
        prompt, answer = problem(rng, f.op, f.digits)
        problems.setdefault(prompt, answer)
    return list(problems.items())


def _item(prompt: str, answer: str) -> dict:
    """Token ids of prompt + answer + end, with the loss on the answer and its end only."""
    ids = encode(prompt + answer) + [EOS]
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt):]
    return {"input_ids": torch.tensor(ids[:-1]), "labels": torch.tensor(labels)}


def build(size: str, seed: int):
    from mightylm.config import ModelConfig
    from mightylm.model import Transformer

    try:
        dim, layers = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise UsageError(f"a size is WIDTHxLAYERS (e.g. 64x3), got {size!r}") from None
    heads = max(h for h in (1, 2, 4, 8) if dim % h == 0 and (dim // h >= 16 or h == 1))
    config = ModelConfig(vocab_size=16, dim=dim, n_layers=layers, n_heads=heads, ffn_dim=3 * dim,
                         max_seq_len=64, tie_embeddings=True)
    torch.manual_seed(seed)
    return Transformer(config)


def train_one(size: str, f: Family, train: list[dict], run_dir: Path, progress: bool = True, seed: int | None = None):
    """Train one member with `fit` (initialisation and data order from `seed`, default f.seed); a run
    interrupted midway resumes from its checkpoint."""
    from mightylm.data.loader import Loader
    from mightylm.train import TrainConfig, fit

    seed = f.seed if seed is None else seed
    model = build(size, seed)
    cfg = TrainConfig(steps=f.steps, batch_size=f.batch_size, lr=f.lr, min_lr=f.lr / 10, warmup=50, weight_decay=0.1,
                      eval_every=10**9, save_every=500, log_every=50, seed=seed)
    fit(model, Loader(train, f.batch_size, seed=seed), run_dir, cfg,
        resume=(run_dir / "checkpoint").exists(), progress=progress)
    return model.eval()


@torch.no_grad()
def measure(model, test: list[tuple[str, str]]) -> dict:
    from mightylm.generate import Sampling, generate

    prompts = [encode(p) for p, _ in test]
    answers = [encode(a) + [EOS] for _, a in test]
    x = torch.tensor([p + a for p, a in zip(prompts, answers)])
    start = len(prompts[0])
    logits = model(x[:, :-1])[:, start - 1:]  # the positions that predict the answer and its end
    target = x[:, start:]
    token_accuracy = (logits.argmax(-1) == target).float().mean().item()
    loglik = F.log_softmax(logits.float(), -1).gather(-1, target[..., None]).mean().item()
    outputs = generate(model, prompts, Sampling(max_new_tokens=len(answers[0]), stop_token_ids=(EOS,)))
    exact = sum(out == ans for out, ans in zip(outputs, answers)) / len(test)
    distance = sum(_edit_distance(out, ans) for out, ans in zip(outputs, answers)) / len(test)
    return {"exact_match": exact, "token_accuracy": token_accuracy, "edit_distance": distance,
            "answer_loglik": loglik, "answer_tokens": len(answers[0]),
            "token_accuracy_pow_L": token_accuracy ** len(answers[0])}


def _edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


METRICS = ("exact_match", "token_accuracy", "edit_distance", "answer_loglik", "token_accuracy_pow_L")


def run(store, f: Family, *, progress: bool = True) -> dict:
    """Train and measure every size (`f.seeds` runs each). The summary's "models" has one record per
    size, averaged over its runs; "runs" has every run."""
    train, test = datasets(f)
    seeds = range(f.seed, f.seed + f.seeds)
    # One run per size keeps the plain ids (and model directories) of a single-seed family.
    items = [{"id": size if f.seeds == 1 else f"{size}@{s}", "size": size, "seed": s} for size in f.sizes for s in seeds]

    def score(chunk):
        item = chunk[0]
        model = train_one(item["size"], f, train, store.dir / "models" / item["id"], progress=progress, seed=item["seed"])
        return [{"size": item["size"], "seed": item["seed"], "params": model.config.n_params, **measure(model, test)}]

    runs = sorted(store.run(items, score, batch_size=1, progress=progress), key=lambda r: (r["params"], r["seed"]))
    records = []
    for size in dict.fromkeys(r["size"] for r in runs):
        mine = [r for r in runs if r["size"] == size]
        records.append({"size": size, "params": mine[0]["params"], "runs": len(mine),
                        "answer_tokens": mine[0]["answer_tokens"],
                        **{k: sum(r[k] for r in mine) / len(mine) for k in METRICS}})
    _plot(records, runs, f, store.dir / "emergence.png")
    return store.finish({"metrics": {"largest_exact_match": records[-1]["exact_match"],
                                     "largest_token_accuracy": records[-1]["token_accuracy"]},
                         "models": records, "runs": runs, "family": asdict(f), "plots": ["emergence.png"]})


def _plot(records: list[dict], runs: list[dict], f: Family, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [r["params"] for r in records]
    panels = [("exact_match", "exact match (discontinuous)"), ("token_accuracy", "per-token accuracy"),
              ("edit_distance", "token edit distance (lower is better)"), ("answer_loglik", "answer log-likelihood / token")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(params, [r[key] for r in records], marker="o", color="C0" if key == "exact_match" else "C1")
        if f.seeds > 1:  # every run as a dot, so a coin-toss size shows as two clusters
            ax.scatter([r["params"] for r in runs], [r[key] for r in runs], s=12, color="black", alpha=0.35, zorder=3)
        if key == "exact_match":
            ax.plot(params, [r["token_accuracy_pow_L"] for r in records], ls="--", color="gray",
                    label=f"per-token accuracy ^ {records[0]['answer_tokens']}")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    runs_note = f", {f.seeds} runs per size (dots; lines: means)" if f.seeds > 1 else ""
    measured = (f"{f.test_examples} of its {f.train_examples} trained problems (recall)" if f.recall
                else f"{f.test_examples} held-out problems")
    fig.suptitle(f"{f.digits}-digit {f.op}: {len(records)} models trained {f.steps} steps each{runs_note} "
                 f"(batch {f.batch_size}), {measured}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
