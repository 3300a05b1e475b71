"""Per-user adapters in the server: a request's "base:NAME" resolved through the registry (serve/registry.py) for
the user its API key belongs to, the live version loaded into the adapter bank on first use, and the loaded set
kept under a memory budget, least recently used first out, pinned ones never (nor one a queued or running request
uses). Conversations of users who opted in are appended to their log.

The bank names a loaded version "OWNER.NAME.vVERSION", so a promotion or rollback loads the new live version
beside the old one, which ages out of the set; requests resolve through the registry every time, so a deleted
or retired version is never served to a new request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict

from mightylm.serve.registry import NotFound, Record, Registry, RegistryError, User


class BudgetFull(RegistryError):
    """Every loaded adapter is pinned or in use, and the one asked for does not fit beside them."""


class PersonalAdapters:
    def __init__(self, registry: Registry, engine, *, budget_bytes: int = 256 << 20, pinned: tuple[str, ...] = ()):
        from mightylm.adapters.files import base_fingerprint

        self.registry, self.engine, self.bank = registry, engine, engine.bank
        self.base = base_fingerprint(engine.model)  # adapters registered for another base are refused
        self.budget = budget_bytes
        self.pinned = set(pinned)  # "OWNER/NAME": every version of it stays once loaded
        self.loaded: OrderedDict[str, int] = OrderedDict()  # bank name -> bytes, least recently used first
        self._loading = asyncio.Lock()
        self._log_lock = threading.Lock()
        self.stats = {"loads": 0, "evictions": 0, "hits": 0}

    @staticmethod
    def bank_name(record: Record) -> str:
        return f"{record.owner}.{record.name}.v{record.version}"

    async def adapter_id(self, user: User, name: str) -> int:
        """The bank id serving `user`'s adapter `name` (the live version), loading it first if needed."""
        record = await asyncio.to_thread(self.registry.resolve, user, name)
        if record.base != self.base:
            raise RegistryError(f"adapter {name!r} was registered for another base model (fingerprint {record.base}; "
                                f"this server's is {self.base})")
        key = self.bank_name(record)
        async with self._loading:  # one load at a time: two requests for a new adapter load it once
            if key in self.bank.ids:
                self.loaded.move_to_end(key)
                self.stats["hits"] += 1
                return self.bank.ids[key]
            prepared = await asyncio.to_thread(self.bank.prepare, key, self.registry.files(record))
            size = _bytes(prepared)
            await asyncio.to_thread(self.engine.call, lambda: self._make_room(size, key))
            await asyncio.to_thread(self.engine.call, lambda: self.bank.install(prepared))
            self.loaded[key] = size
            self.stats["loads"] += 1
            return self.bank.ids[key]

    def _make_room(self, size: int, key: str) -> None:
        """Evict least recently used adapters until `size` more bytes fit (runs between engine steps)."""
        busy = {s.adapter for s in self.engine.running + list(self.engine.waiting)}
        for name in list(self.loaded):
            if sum(self.loaded.values()) + size <= self.budget:
                return
            owner, adapter, _ = name.split(".")
            if f"{owner}/{adapter}" in self.pinned or self.bank.ids.get(name) in busy:
                continue
            self.bank.remove(name)
            del self.loaded[name]
            self.stats["evictions"] += 1
        if sum(self.loaded.values()) + size > self.budget:
            raise BudgetFull(f"cannot load {key} ({size / 2**20:.1f} MiB): the adapter budget "
                             f"({self.budget / 2**20:.0f} MiB) is held by pinned or busy adapters; retry shortly")

    def unload(self, owner: str, adapter: str | None = None) -> None:
        """Drop the loaded versions of `owner`'s adapter (every adapter of theirs without one): after a deletion or
        "forget me"; runs between steps. A version a request still uses stays until it is evicted."""
        busy = {s.adapter for s in self.engine.running + list(self.engine.waiting)}
        for name in [n for n in self.loaded if n.split(".")[0] == owner and adapter in (None, n.split(".")[1])]:
            if self.bank.ids.get(name) not in busy:
                self.bank.remove(name)
                del self.loaded[name]

    def visible_models(self, user: User, base: str) -> list[str]:
        """"base:NAME" for each adapter with a live version the user may use."""
        names = {r.name for r in self.registry.list(user) if r.status == "live"}
        return [f"{base}:{n}" for n in sorted(names)]

    def log(self, user: User, messages: list[dict], reply: str, model: str) -> None:
        """Append one conversation turn to the user's log, if they opted in (never otherwise)."""
        if not user.log_conversations:
            return
        path = self.registry.log_path(user.name)
        line = json.dumps({"messages": [*messages, {"role": "assistant", "content": reply}], "model": model,
                           "time": time.time()}, ensure_ascii=False)
        with self._log_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def _bytes(prepared: dict) -> int:
    """What a prepared adapter will take once installed (in the model's dtype)."""
    tensors = [prepared["prompt"]] if prepared["kind"] == "prompt" else \
        [t for pair in prepared["pairs"].values() for t in pair]
    return sum(t.numel() for t in tensors) * prepared["dtype"].itemsize


__all__ = ["BudgetFull", "NotFound", "PersonalAdapters"]
