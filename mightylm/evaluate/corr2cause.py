"""Corr2Cause (Jin et al. 2023, "Can Large Language Models Infer Causation from Correlation?"),
regenerated from causal graphs instead of downloaded.

For every Markov equivalence class (MEC) of DAGs over N variables, the premise states all the
statistical relations the class implies (d-separation; faithfulness assumed): which pairs
correlate, which are independent, and how conditioning changes that. A hypothesis names one of
six relations between two variables; it is *valid* when it holds in every DAG of the class, so
it follows from the correlations alone (the paper's section 3). The relations (paper, table 2):

    Parent      X directly causes Y            Descendant  Y causes X, not directly
    Child       Y directly causes X            Confounder  some Z directly causes both X and Y
    Ancestor    X causes Y, not directly       Collider    X and Y both directly cause some Z

Two DAGs are Markov equivalent when they share the skeleton and the v-structures (Verma & Pearl
1990); over 2, 3 and 4 labelled variables there are 2, 11 and 185 classes (a test).

The model answers by log-likelihood: "Yes" against "No" after the question.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict

from mightylm.errors import UsageError
from mightylm.evaluate.multiple_choice import pick

RELATIONS = ("parent", "child", "ancestor", "descendant", "confounder", "collider")
NAMES = "ABCDEF"


def dags(n: int) -> list[frozenset]:
    """Every DAG over nodes 0..n-1, as a frozenset of directed edges (parent, child)."""
    pairs = list(itertools.combinations(range(n), 2))
    out = []
    for choice in itertools.product((None, 0, 1), repeat=len(pairs)):
        edges = frozenset((a, b) if c == 0 else (b, a) for (a, b), c in zip(pairs, choice) if c is not None)
        if _acyclic(n, edges):
            out.append(edges)
    return out


def _acyclic(n: int, edges) -> bool:
    indegree = [0] * n
    for _, b in edges:
        indegree[b] += 1
    ready = [v for v in range(n) if indegree[v] == 0]
    seen = 0
    while ready:
        v = ready.pop()
        seen += 1
        for a, b in edges:
            if a == v:
                indegree[b] -= 1
                if indegree[b] == 0:
                    ready.append(b)
    return seen == n


def mec_key(n: int, edges) -> tuple:
    """Skeleton and v-structures (a -> c <- b with a, b not adjacent): equal keys, equal MEC."""
    skeleton = frozenset(frozenset(e) for e in edges)
    parents = defaultdict(set)
    for a, b in edges:
        parents[b].add(a)
    vs = frozenset((frozenset((a, b)), c) for c in range(n) for a, b in itertools.combinations(sorted(parents[c]), 2)
                   if frozenset((a, b)) not in skeleton)
    return skeleton, vs


def equivalence_classes(n: int) -> list[list[frozenset]]:
    classes = defaultdict(list)
    for g in dags(n):
        classes[mec_key(n, g)].append(g)
    return sorted(classes.values(), key=lambda c: sorted(map(sorted, c[0])))


def d_separated(n: int, edges, x: int, y: int, given: frozenset) -> bool:
    """Whether x and y are d-separated by `given` (the moralised ancestral graph criterion,
    Lauritzen et al. 1990): keep x, y, `given` and their ancestors, marry co-parents, drop
    directions, remove `given`; separated when no path is left between x and y."""
    keep = _ancestors(edges, {x, y} | set(given))
    sub = [(a, b) for a, b in edges if a in keep and b in keep]
    neighbours = defaultdict(set)
    for a, b in sub:
        neighbours[a].add(b)
        neighbours[b].add(a)
    parents = defaultdict(set)
    for a, b in sub:
        parents[b].add(a)
    for c in parents:
        for a, b in itertools.combinations(parents[c], 2):
            neighbours[a].add(b)
            neighbours[b].add(a)
    seen, frontier = {x}, [x]
    while frontier:
        v = frontier.pop()
        for w in neighbours[v] - seen:
            if w == y:
                return False
            if w not in given:
                seen.add(w)
                frontier.append(w)
    return True


def _ancestors(edges, nodes: set) -> set:
    out, frontier = set(nodes), list(nodes)
    while frontier:
        v = frontier.pop()
        for a, b in edges:
            if b == v and a not in out:
                out.add(a)
                frontier.append(a)
    return out


def holds(n: int, edges, relation: str, x: int, y: int) -> bool:
    if relation == "parent":
        return (x, y) in edges
    if relation == "child":
        return (y, x) in edges
    if relation == "ancestor":
        return (x, y) not in edges and x in _ancestors(edges, {y}) - {y}
    if relation == "descendant":
        return (y, x) not in edges and y in _ancestors(edges, {x}) - {x}
    if relation == "confounder":
        return any((z, x) in edges and (z, y) in edges for z in range(n))
    if relation == "collider":
        return any((x, z) in edges and (y, z) in edges for z in range(n))
    raise UsageError(f"unknown relation {relation!r}")


def premise(n: int, edges) -> str:
    names = NAMES[:n]
    lines = [f"Suppose there is a closed system of {n} variables, {', '.join(names[:-1])} and {names[-1]}. "
             f"All the statistical relations among these {n} variables are as follows:"]
    for x, y in itertools.combinations(range(n), 2):
        marginal = d_separated(n, edges, x, y, frozenset())
        lines.append(f"{names[x]} is independent of {names[y]}." if marginal else f"{names[x]} correlates with {names[y]}.")
        others = [v for v in range(n) if v not in (x, y)]
        for size in range(1, len(others) + 1):
            for given in itertools.combinations(others, size):
                separated = d_separated(n, edges, x, y, frozenset(given))
                if separated != marginal:
                    cond = " and ".join(names[v] for v in given)
                    lines.append(f"{names[x]} and {names[y]} are independent given {cond}." if separated
                                 else f"{names[x]} and {names[y]} are correlated given {cond}.")
    return " ".join(lines)


def hypothesis(relation: str, x: str, y: str) -> str:
    return {"parent": f"{x} directly causes {y}.", "child": f"{y} directly causes {x}.",
            "ancestor": f"{x} causes something else which causes {y}.",
            "descendant": f"{y} causes something else which causes {x}.",
            "confounder": f"There exists at least one confounder (i.e., common cause) of {x} and {y}.",
            "collider": f"There exists at least one collider (i.e., common effect) of {x} and {y}."}[relation]


def examples(nodes: tuple[int, ...] = (2, 3, 4)) -> list[dict]:
    """Every (MEC, relation, pair) example over graphs of the given sizes, with its label."""
    out = []
    for n in nodes:
        for k, members in enumerate(equivalence_classes(n)):
            text = premise(n, members[0])
            for relation in RELATIONS:
                pairs = itertools.combinations(range(n), 2) if relation in ("confounder", "collider") \
                    else itertools.permutations(range(n), 2)
                for x, y in pairs:
                    valid = all(holds(n, g, relation, x, y) for g in members)
                    out.append({"id": f"n{n}-mec{k}-{relation}-{NAMES[x]}{NAMES[y]}", "nodes": n, "relation": relation,
                                "premise": text, "hypothesis": hypothesis(relation, NAMES[x], NAMES[y]),
                                "valid": valid})
    return out


def sample_examples(nodes=(2, 3, 4), limit: int | None = 600, seed: int = 0) -> list[dict]:
    items = examples(nodes)
    if limit is not None and limit < len(items):
        items = random.Random(seed).sample(items, limit)
    return items


def question(item: dict) -> str:
    return (f"Premise: {item['premise']}\nHypothesis: {item['hypothesis']}\n"
            "Does the hypothesis necessarily follow from the premise? Answer Yes or No.")


def evaluate(store, items: list[dict], backend, *, chat: bool = False, batch_size: int = 8,
             progress: bool = True) -> dict:
    def score(chunk):
        if chat:
            prompts = [backend.encode_chat([{"role": "user", "content": question(i)}]) for i in chunk]
            options = [["Yes", "No"]] * len(chunk)
        else:
            prompts = [question(i) + "\nAnswer:" for i in chunk]
            options = [[" Yes", " No"]] * len(chunk)
        return [{"relation": i["relation"], "nodes": i["nodes"], "valid": i["valid"], "said_valid": p["pred"] == 0,
                 "loglik": p["loglik"]} for i, p in zip(chunk, pick(backend, prompts, options))]

    records = store.run(items, score, batch_size=batch_size, progress=progress)
    return store.finish({"metrics": _f1(records), "examples": len(records),
                         "valid_fraction": sum(r["valid"] for r in records) / len(records),
                         "by_relation": {rel: _f1([r for r in records if r["relation"] == rel]) for rel in RELATIONS}})


def _f1(records: list[dict]) -> dict:
    """The paper's metrics: F1 of the "valid" class (valid hypotheses are rare), precision, recall, accuracy."""
    tp = sum(r["valid"] and r["said_valid"] for r in records)
    fp = sum(not r["valid"] and r["said_valid"] for r in records)
    fn = sum(r["valid"] and not r["said_valid"] for r in records)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "precision": precision, "recall": recall,
            "accuracy": sum(r["valid"] == r["said_valid"] for r in records) / max(1, len(records))}
