"""Supervised fine-tuning data: JSONL in the alpaca shape ({"instruction", "input"?, "output"}) or
the chat shape ({"messages": [{"role", "content"}, ...]}), rendered with the model's chat template.

The loss covers only what the assistant says: for each assistant turn, the template is rendered
up to the turn (with the generation prompt) and through it; the tokens in between are the
answer and are the only labelled ones. Examples longer than `max_len` are cut (and say so once).
`pack=True` concatenates examples into windows of `max_len` to waste no compute on padding; each token
is tagged with its example, and the model attends within an example only and restarts its positions, so a
packed row trains exactly as its examples would one by one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mightylm.data import DataError, iter_jsonl
from mightylm.data.loader import IGNORE

ROLES = ("system", "user", "assistant", "tool")


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; an empty file is an error."""
    rows = list(iter_jsonl(path))
    if not rows:
        raise DataError(f"{path}: empty; expected JSONL with one example per line")
    return rows


def to_messages(record: dict, where: str) -> list[dict]:
    """Either shape, as a list of chat messages."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to learn from")
        return messages
    missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
    if missing:
        raise DataError(f"{where}: expected 'messages' (chat shape) or string fields 'instruction' and 'output' "
                        f"(alpaca shape); missing or not a string: {', '.join(missing)}")
    prompt = record["instruction"]
    if record.get("input"):
        prompt += "\n\n" + str(record["input"])
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask marking assistant tokens."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = len(tokenizer.encode_chat(messages[:i], add_generation_prompt=True))
        through = len(tokenizer.encode_chat(messages[: i + 1], add_generation_prompt=False))
        for j in range(before, min(through, len(ids))):
            mask[j] = 1
    return ids, mask


class SFTDataset:
    """Tokenized examples: items {"input_ids", "labels"} for the loader."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], max_len: int, pack: bool = False):
        self.items = []
        cut = 0
        for ids, mask in examples:
            if len(ids) > max_len + 1:
                cut += 1
                ids, mask = ids[: max_len + 1], mask[: max_len + 1]
            labels = [t if m else IGNORE for t, m in zip(ids, mask)]
            self.items.append((ids[:-1], labels[1:]))
        if cut:
            warnings.warn(f"{cut} of {len(examples)} examples were longer than {max_len} tokens and were cut")
        if pack:
            self.items = _pack(self.items, max_len)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer, *, max_len: int = 512, pack: bool = False) -> "SFTDataset":
        examples = []
        for number, record in read_jsonl(path):
            messages = to_messages(record, f"{path}:{number}")
            examples.append(tokenize_chat(messages, tokenizer))
        return cls(examples, max_len, pack)

    @classmethod
    def from_records(cls, records: list[dict], tokenizer, *, max_len: int = 512, pack: bool = False) -> "SFTDataset":
        return cls.from_conversations([to_messages(r, f"record {i}") for i, r in enumerate(records)], tokenizer,
                                      max_len=max_len, pack=pack)

    @classmethod
    def from_conversations(cls, conversations: list[list[dict]], tokenizer, *, max_len: int = 512,
                           pack: bool = False) -> "SFTDataset":
        return cls([tokenize_chat(messages, tokenizer) for messages in conversations], max_len, pack)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        ids, labels, *documents = self.items[i]
        item = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
        if documents:
            item["documents"] = torch.tensor(documents[0], dtype=torch.long)
        return item


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Every line of a JSONL file as chat messages (a malformed line is refused with the file and line number)."""
    return [to_messages(record, f"{path}:{number}") for number, record in read_jsonl(path)]


def hold_out(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, validation): a seeded shuffle, then `fraction` of the conversations held out (at least one when
    there are two or more)."""
    import random

    rows = list(conversations)
    random.Random(seed).shuffle(rows)
    n_val = max(1, int(len(rows) * fraction)) if len(rows) > 1 else 0
    return rows[n_val:], rows[:n_val]


def _pack(items, max_len: int):
    """Rows of up to `max_len` tokens holding whole examples, each token tagged with its example's number in the
    row, so that attention and positions stay within it (Transformer.forward `documents`). Best-fit decreasing:
    the longest examples are placed first, each into the row it fills most tightly, which leaves far less
    padding than filling rows in order (bench/sft.py: 28 -> 22 rows of 1024 for 21,302 tokens)."""
    import bisect

    rows: list[tuple[list, list, list]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row number), sorted
    for a, b in sorted(items, key=lambda item: len(item[0]), reverse=True):
        i = bisect.bisect_left(room, (len(a), -1))  # the row with the least room that still fits
        if i == len(room):
            rows.append(([], [], []))
            number, free = len(rows) - 1, max_len
        else:
            free, number = room.pop(i)
        ids, labels, documents = rows[number]
        document = documents[-1] + 1 if documents else 0
        ids += a
        labels += b
        documents += [document] * len(a)
        bisect.insort(room, (free - len(a), number))
    return rows
