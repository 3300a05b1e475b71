"""Batches for the training loop: a seeded order over any indexable dataset, with a position that
checkpoints save and restore, so a resumed run sees exactly the batches it would have seen.

Every item is a dict with `input_ids` and `labels` (1-D, same length; label -100 is ignored by
the loss), and for packed rows `documents` (which document each token belongs to); any other key is a per-token
extra (first dimension the tokens, such as a teacher cache's top-k) padded with zeros. Items of different
lengths are right-padded to the longest in the batch.
Under torch.distributed each rank takes its slice of every global batch, so N processes with a
per-rank batch of B see the same data as one process with a batch of N*B.
"""

from __future__ import annotations

import torch

from mightylm.model import IGNORE_INDEX

IGNORE = IGNORE_INDEX  # the label the loss skips; the model's constant, under the name the data modules use
PER_SAMPLE = {"image_features"}  # keys that hold one tensor per sample rather than one row per token


def collate(items: list[dict], pad_id: int = 0) -> dict:
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
    batch = {"input_ids": input_ids, "labels": labels}
    if "documents" in items[0]:  # packed rows: the padding at a row's end is one more document of its own
        documents = torch.empty((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["documents"])
            documents[row, :n] = item["documents"]
            documents[row, n:] = (item["documents"][-1] + 1) if n else 0
        batch["documents"] = documents
    for key in items[0].keys() & PER_SAMPLE:  # one tensor per sample, of one shape (an image's features): stacked
        batch[key] = torch.stack([item[key] for item in items])
    for key in items[0].keys() - {"input_ids", "labels", "documents", *PER_SAMPLE}:  # per-token extras (top-k)
        first = items[0][key]
        extra = torch.zeros((len(items), width, *first.shape[1:]), dtype=first.dtype)
        for row, item in enumerate(items):
            extra[row, :len(item[key])] = item[key]
        batch[key] = extra
    return batch


class Loader:
    """Endless batches: epoch after epoch, each in a fresh order drawn from (seed, epoch)."""

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True, pad_id: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.pad_id, self.rank, self.world_size = pad_id, rank, world_size
        self.global_batch = batch_size * world_size
        self.epoch, self.index = 0, 0  # position: the next batch starts at order[index] of `epoch`
        self._order = self._make_order()

    def _make_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def next_batch(self) -> dict:
        ids = []
        while len(ids) < self.global_batch:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            ids.append(int(self._order[self.index]))
            self.index += 1
        mine = ids[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return collate([self.dataset[i] for i in mine], self.pad_id)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
        self._order = self._make_order()

    def first_pass(self):
        """Each item once, in order, in batches (for validation)."""
        for start in range(0, len(self.dataset), self.batch_size):
            yield collate([self.dataset[i] for i in range(start, min(start + self.batch_size, len(self.dataset)))],
                          self.pad_id)
