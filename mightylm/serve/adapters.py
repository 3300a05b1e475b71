"""Per-request adapters for serving: many LoRA adapters and soft prompts over one base model, in one
batch, without merging anything into the weights.

- LoRA: every linear layer some adapter targets (a plain nn.Linear, or a GGUF file's blocks kept as stored) is
  wrapped in a `MultiLoRALinear` (a module transform, like `apply_lora`): the base layer's product for every row,
  plus, for each adapter present in the batch,
  ((x A_i^T) * m_i) (s_i B_i)^T, where the row mask m_i is 1 on that adapter's rows and 0 elsewhere
  (at LoRA ranks the product for every row costs less than gathering and scattering rows). The
  masks are made once per forward (`AdapterBank.set_rows`), not in each of the hundreds of layers.
- Soft prompts (prompt tuning, P-tuning): the P virtual-token embeddings are put in front of the
  request's token embeddings at prefill (`Transformer.forward(embeds=...)`); decoding needs nothing.

Adapters can be added and removed while serving; the engine does it between steps. Over kept GGUF blocks or 2:4
weights the server starts in the decode layout (fuse.py: a batch's decode step in one native call). A LoRA adapter
on the blocks' projections then also gets a native table (`native_table`: its A and B of every block, for
kernels/gemv.c's lora_rows), and a pass with LoRA rows still runs in one native call, each row adding its own
adapter's terms; what the native call does not take (a long prompt, an adapter on other layers of a block) runs the
blocks eagerly through the wrapped layers (`AdapterBank.set_rows`).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mightylm.adapters import KINDS, AdapterError, kind_of, read_adapter_config, warn_if_other_base
from mightylm.compress.gguf_blocks import GGUFLinear
from mightylm.compress.sparse24 import Sparse24Linear
from mightylm.fuse import native_table


class MultiLoRALinear(nn.Module):
    """A base linear layer (nn.Linear, GGUFLinear's kept blocks or 2:4 Sparse24Linear) + any number of LoRA adapters
    chosen per row."""

    def __init__(self, base: nn.Module, bank: "AdapterBank"):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bank = bank
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # adapter id -> (A, scale * B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for i, mask in self.bank.present.items():
            pair = self.pairs.get(i)
            if pair is None:
                continue
            h = F.linear(x, pair[0])  # (B, T, r): every row, cheap at LoRA ranks
            if mask is not None:
                h = h * mask  # zero for the rows that use another adapter or none
            y = y + F.linear(h, pair[1])
        return y


class AdapterBank:
    """The adapters a server holds, by name; id 0 is the base model (no adapter)."""

    def __init__(self, model):
        self.model = model
        self.ids: dict[str, int] = {}
        self.kinds: dict[str, str] = {}
        self.prompts: dict[int, torch.Tensor] = {}  # adapter id -> (P, dim) virtual-token embeddings
        # adapter id -> (B, 1, 1) 1.0 on the batch rows that use it (None: all of them), for the ids in the batch but 0
        self.present: dict[int, torch.Tensor | None] = {}
        self._next = 1
        self._natives = None  # (the model's native stack, each block's native call) once LoRA layers are wrapped
        self._tables: dict[int, tuple] = {}  # LoRA adapter id -> its native_table, where the native stack takes it

    def set_rows(self, ids: list[int]) -> None:
        """Say which adapter each row of the next forward passes uses (0: the base model)."""
        device = self.model.device
        self.present = {}
        for i in sorted(set(ids) - {0}):
            rows = [r for r, a in enumerate(ids) if a == i]
            mask = torch.tensor([[[float(a == i)]] for a in ids], dtype=self.model.dtype, device=device)
            self.present[i] = None if len(rows) == len(ids) else mask  # (B, 1, 1)
        if self._natives is not None:  # the native calls take LoRA rows whose adapters have tables
            stack, blocks = self._natives
            lora = self.lora_ids & self.present.keys()
            on = lora <= self._tables.keys()
            stack.lora = (ctypes.c_void_p * len(ids))(*(ctypes.addressof(self._tables[i][0]) if i in lora else None
                                                        for i in ids)) if lora and on else None
            self.model.fused_decode = stack if on else None
            for block, native in zip(self.model.layers, blocks):
                block.fused_decode = native if on else None
                native.lora = stack.lora

    def _keep_natives_apart(self) -> None:
        """Before the first LoRA wraps layers of a model in the decode layout (as `mighty serve` starts over kept
        GGUF blocks or 2:4 weights): the fused q/k/v and gate/up products the eager blocks would call instead of the
        wrapped layers go (their weights stay, the layers' own are views into them), and the native calls, which
        read the same weights, are kept, given each pass's LoRA rows by set_rows."""
        if self._natives is None and getattr(self.model, "fused_decode", None) is not None:
            self._natives = (self.model.fused_decode, [block.fused_decode for block in self.model.layers])
        for m in self.model.modules():
            if getattr(m, "fused_qkv", None) is not None:
                m.fused_qkv = None
            if getattr(m, "fused_gate_up", None) is not None:
                m.fused_gate_up = None

    @property
    def lora_ids(self) -> set[int]:
        return {self.ids[name] for name, kind in self.kinds.items() if kind == "lora"}

    def add(self, name: str, path: str | Path) -> str:
        """Load the adapter in `path` under `name`; returns what it is."""
        return self.install(self.prepare(name, path))

    def prepare(self, name: str, path: str | Path) -> dict:
        """Read and check the adapter in `path` (files, shapes, kind) without changing the model: the slow part
        of loading, which a server runs off its engine thread. It does no arithmetic on the tensors (a large
        tensor's would start an OpenMP team in that thread, and with two teams libgomp stops spinning between the
        engine's products: serve/command.py, _on_engine_thread); `install` scales and converts them and swaps them
        in."""
        from mightylm.adapters.lora import lora_scaling, read_lora

        self._check_name(name)
        cfg = read_adapter_config(path)
        warn_if_other_base(self.model, cfg, path)
        kind = kind_of(cfg, path)
        if not kind.per_request:
            served = ", ".join(t for k in KINDS if k.per_request for t in k.peft_types)
            raise AdapterError(f"{Path(path) / 'adapter_config.json'}: peft_type {cfg['peft_type']!r} cannot be served "
                               f"per request ({served} can); merge it or apply it to the base with --adapter")
        dtype = self.model.dtype
        if kind.name == "lora":
            if cfg.get("mightylm_base_quantization"):
                raise AdapterError(f"{path}: a QLoRA adapter needs its NF4 base; serve it merged (mighty merge) "
                                   "or start the server on the quantized base")
            cfg, pairs = read_lora(self.model, path, cfg)
            modules = dict(self.model.named_modules())
            for module_name in pairs:
                module = modules[module_name]
                bases = (MultiLoRALinear, GGUFLinear, Sparse24Linear)
                if not isinstance(module, bases) and type(module) is not nn.Linear:
                    raise AdapterError(f"{path}: {module_name} is a {type(module).__name__}; per-request LoRA "
                                       "needs a plain linear base layer (or a GGUF file's kept blocks, or 2:4 weights)")
            return {"name": name, "kind": "lora", "dtype": dtype, "scaling": lora_scaling(cfg),
                    "pairs": {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}}
        from mightylm.adapters.prompt import read_prompt  # the other kind served per request: soft prompts

        prompt = read_prompt(self.model, path, cfg)
        return {"name": name, "kind": "prompt", "dtype": dtype, "prompt": prompt,
                "what": f"{cfg['peft_type'].lower().replace('_', ' ')}: {prompt.shape[0]} virtual tokens"}

    def install(self, prepared: dict) -> str:
        """Put a prepared adapter in place (conversions of small tensors, module swaps and dictionary updates:
        quick, for between steps, on the engine's thread)."""
        self._check_name(prepared["name"])
        dtype = prepared["dtype"]
        device = self.model.device
        if prepared["kind"] == "prompt":
            self.prompts[self._new_id(prepared["name"], "prompt")] = prepared["prompt"].to(device, dtype)
            return prepared["what"]
        self._keep_natives_apart()
        i = self._new_id(prepared["name"], "lora")
        modules, installed = dict(self.model.named_modules()), {}
        for module_name, pair in prepared["pairs"].items():
            module = modules[module_name]
            if not isinstance(module, MultiLoRALinear):
                parent_name, _, leaf = module_name.rpartition(".")
                module = MultiLoRALinear(module, self)
                setattr(modules[parent_name], leaf, module)
            A, B = pair
            # scale * B held as (r, out) rows, seen as (out, r): the native table reads the same bytes (no copy)
            module.pairs[i] = (A.to(device, dtype).contiguous(),
                               (B * prepared["scaling"]).to(device, dtype).t().contiguous().t())
            installed[module_name] = module.pairs[i]
        if self._natives is not None:
            table = native_table(self.model, installed)
            if table is not None:
                self._tables[i] = table
        return f"LoRA on {len(prepared['pairs'])} layers"

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or ":" in name or "/" in name:
            raise AdapterError(f"adapter name {name!r}: use letters, digits, '-' or '_' (no ':' or '/')")
        if name in self.ids:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")

    def _new_id(self, name: str, kind: str) -> int:
        i = self._next
        self._next += 1
        self.ids[name], self.kinds[name] = i, kind
        return i

    def remove(self, name: str) -> None:
        i = self.ids.pop(name)
        self.kinds.pop(name)
        self.prompts.pop(i, None)
        self._tables.pop(i, None)
        for module in self.model.modules():
            if isinstance(module, MultiLoRALinear):
                module.pairs.pop(i, None)

    def prefix(self, i: int) -> torch.Tensor | None:
        return self.prompts.get(i)

    def prefix_len(self, i: int) -> int:
        """Virtual tokens adapter `i` puts before every prompt (0 for LoRA and the base model)."""
        prompt = self.prompts.get(i)
        return 0 if prompt is None else prompt.shape[0]
