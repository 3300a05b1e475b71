"""Multi-digit addition and multiplication by number of digits (Dziri et al. 2023, "Faith and Fate":
accuracy falls as the computation grows).

Problems come from `data.synthetic` (seeded, exact answers). A chat model is asked in its chat
template to answer with the number only; a plain model is shown three solved problems first.
The last integer in the reply is compared with the answer (exact match): chat models often restate
the problem ("9 + 3 = 12") before the result.
"""

from __future__ import annotations

import re

from mightylm.data.synthetic import generate_task
from mightylm.errors import UsageError

OPS = {"addition": "+", "multiplication": "*"}


def problems(ops=("addition", "multiplication"), digits=(1, 2, 3, 4, 5), n: int = 20, seed: int = 0) -> list[dict]:
    items = []
    for op in ops:
        if op not in OPS:
            raise UsageError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
        for d in digits:
            for i, ex in enumerate(generate_task(op, n, seed=seed, size=d)):
                items.append({"id": f"{op}-{d}-{i}", "op": op, "digits": d, "question": ex["input"],
                              "answer": ex["output"]})
    return items


def prompt(item: dict, backend, chat: bool) -> str:
    if chat:
        return backend.encode_chat([{"role": "user", "content": f"What is {item['question']}? "
                                     "Answer with the number only."}])
    shots = generate_task(item["op"], 3, seed=10_000 + item["digits"], size=item["digits"])
    return "".join(f"{s['input']} = {s['output']}\n" for s in shots) + f"{item['question']} ="


def last_integer(text: str) -> str | None:
    found = re.findall(r"-?\d[\d,]*", text)
    return found[-1].rstrip(",").replace(",", "") if found else None


def evaluate(store, items: list[dict], backend, *, chat: bool = False, batch_size: int = 8,
             progress: bool = True) -> dict:
    def score(chunk):
        width = max(len(i["answer"]) for i in chunk)
        replies = backend.generate([prompt(i, backend, chat) for i in chunk], max_new_tokens=width + 8,
                                   stop=("\n",) if not chat else ())
        return [{"op": i["op"], "digits": i["digits"], "answer": i["answer"], "reply": r,
                 "correct": last_integer(r) == i["answer"]} for i, r in zip(chunk, replies)]

    records = store.run(items, score, batch_size=batch_size, progress=progress)
    table: dict[str, dict[str, float]] = {}
    for op in dict.fromkeys(r["op"] for r in records):
        for d in sorted({r["digits"] for r in records if r["op"] == op}):
            hits = [r["correct"] for r in records if r["op"] == op and r["digits"] == d]
            table.setdefault(op, {})[str(d)] = sum(hits) / len(hits)
    _plot(table, store.dir / "accuracy_by_digits.png")
    return store.finish({"metrics": {"accuracy": sum(r["correct"] for r in records) / len(records)},
                         "by_digits": table, "problems": len(records), "plots": ["accuracy_by_digits.png"]})


def _plot(table: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for op, row in table.items():
        ax.plot([int(d) for d in row], list(row.values()), marker="o", label=op)
    ax.set_xlabel("digits per operand")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
