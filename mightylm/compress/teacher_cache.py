"""An offline teacher: its top-k next-token log-probabilities at every position of a dataset, computed once and
memory-mapped beside the data, so the student trains without the teacher in memory (a 1.7B teacher and a 135M
student do not fit one laptop together; their cache does, on disk).

A cache directory holds
    meta.json       k, the vocabulary, the items, how many are done, and a fingerprint of the token ids it was made
                    from (a cache made with another tokenizer or other data is refused, not silently misaligned)
    ids.bin         (tokens, k) int32, the teacher's k most likely next tokens at each position, item after item
    logprobs.bin    (tokens, k) float32, their log-probabilities (temperature 1, over the student's vocabulary)
Building is resumable: items are written in order and `done` is advanced (atomically) every few items, so an
interrupted build continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from mightylm.compress.distill import DistillationError, teacher_top_k


def fingerprint(dataset) -> str:
    """sha256 of every item's token ids (and so of the tokenizer and the data that made them)."""
    return _scan(dataset)[0]


def _scan(dataset) -> tuple[str, list[int]]:
    """(fingerprint, each item's length), in one pass over the items."""
    h, lengths = hashlib.sha256(), []
    for i in range(len(dataset)):
        ids = np.asarray(dataset[i]["input_ids"], dtype=np.int64)
        h.update(ids.tobytes())
        h.update(b"|")
        lengths.append(len(ids))
    return h.hexdigest(), lengths


class TeacherCache:
    """Read access to a complete cache: cache[i] -> (ids (T_i, k), logprobs (T_i, k)) for dataset item i."""

    def __init__(self, path: str | Path, dataset=None):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DistillationError(f"{self.path}: not a teacher cache (no meta.json); make one with "
                                    "`mighty distill --teacher_cache DIR` and a teacher")
        self.meta = json.loads(meta_file.read_text())
        if self.meta["done"] < self.meta["items"]:
            raise DistillationError(f"{self.path}: the cache is incomplete ({self.meta['done']} of "
                                    f"{self.meta['items']} items); run the same command with the teacher to finish it")
        if dataset is not None:
            self.check(dataset)
        shape = (self.meta["tokens"], self.meta["k"])
        self.ids = np.memmap(self.path / "ids.bin", dtype=np.int32, mode="r", shape=shape)
        self.logprobs = np.memmap(self.path / "logprobs.bin", dtype=np.float32, mode="r", shape=shape)
        self.offsets = np.asarray(self.meta["offsets"], dtype=np.int64)

    def check(self, dataset) -> None:
        if len(dataset) != self.meta["items"] or fingerprint(dataset) != self.meta["fingerprint"]:
            raise DistillationError(f"{self.path}: this teacher cache was made from other token ids ({self.meta['items']} "
                                    f"items; now {len(dataset)}): another tokenizer, other data or other data "
                                    "settings (max_len, packing). Make a new cache (another --teacher_cache directory)")

    def __len__(self) -> int:
        return self.meta["items"]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return torch.from_numpy(np.array(self.ids[a:b])), torch.from_numpy(np.array(self.logprobs[a:b]))

    @classmethod
    def build(cls, teacher, dataset, path: str | Path, *, k: int, vocab: int, progress: bool = True,
              every: int = 16) -> TeacherCache:
        """Run the teacher over every item of `dataset` (resuming a partial cache in `path`) and return the cache."""
        from tqdm import tqdm

        path = Path(path)
        meta_file = path / "meta.json"
        if path.is_dir() and any(path.iterdir()) and not meta_file.exists():
            raise DistillationError(f"{path}: holds files that are not a teacher cache; give a new or empty directory "
                                    "for --teacher_cache (nothing there was changed)")
        path.mkdir(parents=True, exist_ok=True)
        print_, lengths = _scan(dataset)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        fresh = {"k": k, "vocab": vocab, "items": len(dataset), "tokens": offsets[-1], "fingerprint": print_,
                 "offsets": offsets, "done": 0}
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            if {key: meta.get(key) for key in ("k", "vocab", "fingerprint")} != \
                    {key: fresh[key] for key in ("k", "vocab", "fingerprint")}:
                raise DistillationError(f"{path}: holds a teacher cache for other data, tokenizer or k (k {meta.get('k')}"
                                        f" vs {k}); use a new --teacher_cache directory")
        else:
            meta = fresh
            for name, dtype in (("ids.bin", np.int32), ("logprobs.bin", np.float32)):
                np.memmap(path / name, dtype=dtype, mode="w+", shape=(max(1, meta["tokens"]), k)).flush()
            _write_meta(meta_file, meta)
        shape = (max(1, meta["tokens"]), k)
        ids_map = np.memmap(path / "ids.bin", dtype=np.int32, mode="r+", shape=shape)
        lp_map = np.memmap(path / "logprobs.bin", dtype=np.float32, mode="r+", shape=shape)
        teacher.eval()
        for i in tqdm(range(meta["done"], meta["items"]), desc="teacher cache", initial=meta["done"],
                      total=meta["items"], disable=not progress):
            item = dataset[i]
            ids = torch.as_tensor(item["input_ids"])[None]
            documents = torch.as_tensor(item["documents"])[None] if "documents" in item else None
            top_ids, top_lp = teacher_top_k(teacher, ids, k, vocab, documents)
            a, b = offsets[i], offsets[i + 1]
            ids_map[a:b], lp_map[a:b] = top_ids[0].numpy(), top_lp[0].numpy()
            if (i + 1) % every == 0 or i + 1 == meta["items"]:
                ids_map.flush()
                lp_map.flush()
                meta["done"] = i + 1
                _write_meta(meta_file, meta)
        del ids_map, lp_map
        return cls(path)  # its fingerprint was compared with the dataset's above


def _write_meta(file: Path, meta: dict) -> None:
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, file)


class WithTeacher:
    """A dataset whose items also carry the cached teacher's top-k (`teacher_ids`, `teacher_logprobs`), lined up with
    their tokens; the loader pads them with the rest of the batch."""

    def __init__(self, dataset, cache: TeacherCache):
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        ids, logprobs = self.cache[i]
        return {**self.dataset[i], "teacher_ids": ids, "teacher_logprobs": logprobs}
