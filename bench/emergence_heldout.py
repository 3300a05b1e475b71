"""What a recall family of `mighty eval emergence` learned: recall of its trained problems against
computing held-out ones, with the same models.

`mighty eval emergence` (default: --recall true) keeps every model in OUT/emergence/models; this loads
each one from its final checkpoint (its resume path) and measures it on the problems it trained on (the run's own figures,
recomputed) and on as many held-out problems of the same kind, never trained on. A model that
multiplies scores alike on both; one that recalls scores well only on the first.

    .venv/bin/mighty eval emergence --out /tmp/em && .venv/bin/python bench/emergence_heldout.py --run /tmp/em
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mightylm.evaluate import emergence as em


def held_out(f: em.Family, trained: set[str], n: int) -> list[tuple[str, str]]:
    """`n` distinct problems that are not among the trained ones."""
    rng = random.Random(f"held-out:{f.op}:{f.digits}:{f.seed}")
    problems = {}
    while len(problems) < n:
        prompt, answer = em.problem(rng, f.op, f.digits)
        if prompt not in trained:
            problems.setdefault(prompt, answer)
    return list(problems.items())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the --out directory of a `mighty eval emergence --recall true` run")
    args = parser.parse_args()
    summary = json.loads((Path(args.run) / "emergence" / "summary.json").read_text())
    family = em.Family(**{**summary["family"], "sizes": tuple(summary["family"]["sizes"])})
    if not family.recall or family.seeds != 1:
        raise SystemExit(f"{args.run}: needs a run made with --recall true and one seed per size")
    train, test = em.datasets(family)
    trained = {"".join(em.VOCAB[t] for t in item["input_ids"][:2 * family.digits + 2].tolist()) for item in train}
    other = held_out(family, trained, len(test))
    print(f"{family.digits}-digit {family.op}, {family.train_examples} trained problems; {len(test)} of them "
          f"and {len(other)} held-out ones")
    print(f"{'model':>6s} {'params':>8s} {'recall: exact':>13s} {'tok acc':>7s} {'held-out: exact':>15s} {'tok acc':>7s}")
    for size in family.sizes:
        # The run's own resume path: a finished model is loaded from its checkpoint, with no step left to train.
        model = em.train_one(size, family, train, Path(args.run) / "emergence" / "models" / size, progress=False)
        a, b = em.measure(model, test), em.measure(model, other)
        print(f"{size:>6s} {model.config.n_params:8d} {a['exact_match']:13.3f} {a['token_accuracy']:7.3f} "
              f"{b['exact_match']:15.3f} {b['token_accuracy']:7.3f}")


if __name__ == "__main__":
    main()
