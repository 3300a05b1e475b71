"""Long-context evaluation: passkey retrieval by length and depth, BABILong-style fact questions by length, and
perplexity by position.

Passkey (Mohtashami & Jaggi 2023, the needle-in-a-haystack form): a five-digit number is stated once, at a given
depth (0 = start, 1 = end) of filler text from a corpus, and asked for at the end; the model's greedy answer is
right when its first number is the key. Fact questions (Kuratov et al. 2024, BABILong, from bAbI's tasks): qa1,
a single supporting fact (people move between rooms; where is one of them?), and qa2, two supporting facts (someone
picks up an object and moves; where is the object?), the facts spread in order at random places of the filler;
right when the first room named in the answer is the room. Lengths are the prompt's tokens, so a model is
measured inside and past the length it was trained at (and with a RoPE scaling, `mighty eval longctx
--rope_scaling yarn:4`).

Perplexity by position: windows of `length` tokens of held-out text scored in one pass each, the negative
log-likelihood averaged per bucket of positions; a model that cannot use its positions past some length shows it as
a rise in the later buckets.

Both run past the model's declared context on purpose (that is what they measure), through the decode loop's
parts (generate.prefill, decode_one_token), not `generate`, which refuses that.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from mightylm.errors import UsageError
from mightylm.generate import Sampling, decode_one_token, prefill

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def _filler(body: list[int], length: int, used: int, least: int, rng: random.Random) -> list[int]:
    """The filler tokens that bring a prompt of `used` other tokens to `length`, cut from a random place of `body`
    (at least `least` of them)."""
    room = length - used
    if room < least:
        raise UsageError(f"length {length} leaves no room for filler around the question ({used} tokens); use "
                         f"lengths of at least {used + 16}")
    if room > len(body):
        raise UsageError(f"length {length} needs {room} tokens of filler; the text has {len(body)}")
    start = rng.randrange(0, len(body) - room + 1)
    return body[start:start + room]


def passkey_items(tokenizer, filler: str, lengths: list[int], depths: list[float], samples: int,
                  seed: int = 0) -> list[dict]:
    """One prompt per (length, depth, sample): {"length", "depth", "key", "ids"}; the filler is cut from
    different places of `filler` for each sample."""
    rng = random.Random(seed)
    body = tokenizer.encode(filler)
    intro, question = tokenizer.encode(INTRO), tokenizer.encode(QUESTION)
    items = []
    for length in lengths:
        for depth in depths:
            if not 0 <= depth <= 1:
                raise UsageError(f"a depth is a fraction of the text, 0 (start) to 1 (end); got {depth}")
            for _ in range(samples):
                key = rng.randrange(10000, 100000)
                needle = tokenizer.encode(NEEDLE.format(key=key))
                filler_ids = _filler(body, length, len(intro) + len(needle) + len(question), 1, rng)
                cut = round(depth * len(filler_ids))
                ids = intro + filler_ids[:cut] + needle + filler_ids[cut:] + question
                items.append({"length": length, "depth": depth, "key": key, "ids": ids})
    return items


NAMES = ("Mary", "John", "Sandra", "Daniel")
PLACES = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
OBJECTS = ("football", "apple", "milk")
STORY_INTRO = "A short story is hidden inside a lot of irrelevant text. Read it and answer the question about it.\n\n"
TASKS = ("passkey", "qa1", "qa2")


def _story(task: str, rng: random.Random) -> tuple[list[str], str, str]:
    """(facts in order, the question ending where the answer begins, the answer room)."""
    where = {}
    facts = []
    if task == "qa1":
        for _ in range(4):
            name, place = rng.choice(NAMES), rng.choice(PLACES)
            facts.append(f" {name} went to the {place}. ")
            where[name] = place
        name = rng.choice(sorted(where))
        return facts, f"\n\nQuestion: Where is {name}? Answer: {name} is in the", where[name]
    holder, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    others = [n for n in NAMES if n != holder]
    steps = [f" {holder} picked up the {thing}. "]
    for _ in range(3):  # the holder moves; others move around them
        name = rng.choice([holder] + others)
        place = rng.choice(PLACES)
        steps.append(f" {name} went to the {place}. ")
        where[name] = place
    if holder not in where:
        place = rng.choice(PLACES)
        steps.append(f" {holder} went to the {place}. ")
        where[holder] = place
    return steps, f"\n\nQuestion: Where is the {thing}? Answer: The {thing} is in the", where[holder]


def fact_items(tokenizer, filler: str, lengths: list[int], task: str, samples: int, seed: int = 0) -> list[dict]:
    """One prompt per (length, sample): {"task", "length", "key" (the room), "ids"}: the story's facts at sorted
    random places of filler cut from `filler`, the question at the end."""
    if task not in ("qa1", "qa2"):
        raise UsageError(f"unknown fact task {task!r}; known: qa1, qa2")
    rng = random.Random(f"{seed}-{task}")
    body = tokenizer.encode(filler)
    intro = tokenizer.encode(STORY_INTRO)
    items = []
    for length in lengths:
        for _ in range(samples):
            facts, question, room_name = _story(task, rng)
            fact_ids = [tokenizer.encode(f) for f in facts]
            question_ids = tokenizer.encode(question)
            filler_ids = _filler(body, length, len(intro) + sum(map(len, fact_ids)) + len(question_ids), len(facts),
                                 rng)
            cuts = sorted(rng.sample(range(len(filler_ids) + 1), len(facts)))
            ids, last = list(intro), 0
            for cut, fact in zip(cuts, fact_ids):
                ids += filler_ids[last:cut] + fact
                last = cut
            items.append({"task": task, "length": length, "key": room_name,
                          "ids": ids + filler_ids[last:] + question_ids})
    return items


@torch.inference_mode()
def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids`, past the model's declared context if need be; a RecurrentMemory reads `ids`
    segment by segment into its memory first (rmt.generate_rmt)."""
    from mightylm.rmt import RecurrentMemory, generate_rmt

    if isinstance(model, RecurrentMemory):
        return list(generate_rmt(model, ids, Sampling(max_new_tokens=n, temperature=0.0)))
    cache = model.make_cache(1, len(ids) + n)
    token = prefill(model, torch.tensor([ids]), cache).argmax(-1)
    out = [int(token)]
    for step in range(n - 1):
        token = decode_one_token(model, token, cache, len(ids) + step).argmax(-1)
        out.append(int(token))
    return out


def first_number(text: str) -> int | None:
    digits = ""
    for ch in text:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return int(digits) if digits else None


def first_place(text: str) -> str | None:
    """The first room named in `text`."""
    found = [(text.find(p), p) for p in PLACES if p in text]
    return min(found)[1] if found else None


def passkey(model, tokenizer, items: list[dict], answer_tokens: int = 8, progress=None) -> dict:
    """Passkey accuracy overall and by (length, depth); each item gets "answer" and "correct"."""
    _answer(model, tokenizer, items, answer_tokens, progress)
    table: dict[str, dict[str, float]] = {}
    for length in sorted({i["length"] for i in items}):
        row = {}
        for depth in sorted({i["depth"] for i in items}):
            cell = [i["correct"] for i in items if i["length"] == length and i["depth"] == depth]
            row[f"{depth:g}"] = sum(cell) / len(cell)
        table[str(length)] = row
    return {"accuracy": sum(i["correct"] for i in items) / len(items), "by_length_depth": table}


def facts(model, tokenizer, items: list[dict], answer_tokens: int = 6, progress=None) -> dict:
    """Fact-question accuracy overall and by length; each item gets "answer" and "correct"."""
    _answer(model, tokenizer, items, answer_tokens, progress)
    by_length = {}
    for length in sorted({i["length"] for i in items}):
        cell = [i["correct"] for i in items if i["length"] == length]
        by_length[str(length)] = sum(cell) / len(cell)
    return {"accuracy": sum(i["correct"] for i in items) / len(items), "by_length": by_length}


def _answer(model, tokenizer, items: list[dict], answer_tokens: int, progress) -> None:
    for item in items:
        item["answer"] = tokenizer.decode(greedy(model, item["ids"], answer_tokens))
        found = first_place(item["answer"]) if item.get("task", "passkey") != "passkey" else first_number(item["answer"])
        item["correct"] = found == item["key"]
        if progress:
            progress(item)


@torch.inference_mode()
def position_perplexity(model, tokenizer, text: str, length: int, bucket: int, windows: int = 1) -> dict:
    """Mean negative log-likelihood (nats/token) and perplexity per bucket of positions, over up to `windows`
    disjoint windows of `length` tokens from the start of `text`."""
    if bucket < 1 or bucket > length:
        raise UsageError(f"need 1 <= bucket <= length, got bucket {bucket}, length {length}")
    ids = tokenizer.encode(text)
    count = min(windows, len(ids) // length)
    if count < 1:
        raise UsageError(f"the text has {len(ids)} tokens; one window needs {length}")
    nll = torch.zeros(length - 1)
    for w in range(count):
        idx = torch.tensor([ids[w * length:(w + 1) * length]])
        logits = model(idx)[0, :-1].float()  # (length - 1, V): position p predicts token p + 1
        nll += F.cross_entropy(logits, idx[0, 1:], reduction="none")
    nll /= count
    buckets = []
    for start in range(0, length - 1, bucket):
        part = nll[start:start + bucket]
        mean = float(part.mean())
        buckets.append({"positions": f"{start + 1}-{start + len(part)}", "nll": mean, "perplexity": math.exp(mean)})
    return {"windows": count, "buckets": buckets, "nll": float(nll.mean())}
