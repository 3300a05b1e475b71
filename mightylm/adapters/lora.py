"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear layer W gets a trainable low-rank update: y = x W^T + (alpha / r) * x A^T B^T,
with A (r, in) initialised like a linear layer and B (out, r) at zero, so the model is unchanged
at the start (section 4.1). rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead,
which keeps the update's size stable as r grows.

How it hooks in: `apply_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=16)` swaps each
targeted `nn.Linear` for a `LoRALinear` in place, keeping the base `weight`/`bias` keys and
tensors, and returns the names it converted; `adapters.mark_trainable` (called by the one training
loop) then freezes everything but the adapters. `merge_lora` folds B A into W for deployment.

Files are PEFT's: adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<HF module name>.lora_A.weight`, so `peft.PeftModel.from_pretrained` loads
ours on the equivalent `transformers` model and we load PEFT's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mightylm.adapters.files import AdapterError, read_adapter, read_adapter_config
from mightylm.checkpoint import hf_to_ours, ours_to_hf, rename
from mightylm.checkpoint.names import fused_parts, our_leaves, projection_rows

PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """nn.Linear + a low-rank update. `weight`/`bias` are the frozen base's own tensors.

    Over a quantized base (QLoRA: any module with `dequantize()`, e.g. compress.nf4.NF4Linear) the
    base is kept whole as `base_layer` and computes its own product; the adapter is the same."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.base_layer = None
        if isinstance(base, nn.Linear):
            self.weight, self.bias = base.weight, base.bias  # reuse, never copy
            device, dtype = base.weight.device, base.weight.dtype
        else:  # a quantized base: its packed weight is no nn.Linear weight
            del self.weight, self.bias
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            self.base_layer = base
            device, dtype = base.weight.device, torch.float32
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT do
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.merged and self.base_layer is None and isinstance(self.dropout, nn.Identity)
                and _LoRAProduct.applies(x)):
            return _LoRAProduct.apply(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling)
        y = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)
        if self.merged:
            return y
        xa = self.lora_A(self.dropout(x))  # (..., r)
        # y + scaling * xa @ B^T as one addmm: no separate scale and add passes over the (..., out) output,
        # in forward or backward (measured on a 2-core AMD EPYC: LoRA training 1.06x faster at 15M, 1.10x at
        # SmolLM2-135M's shape).
        return torch.addmm(y.flatten(0, -2), xa.flatten(0, -2), self.lora_B.weight.t(), alpha=self.scaling).view(y.shape)

    def delta(self) -> torch.Tensor:
        """B A * scaling, the (out, in) update the adapter adds to the weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.base_layer is not None:
            raise AdapterError("cannot merge LoRA into a quantized base in place: dequantize the base first "
                               "(compress.quantize.dequantize_, which `mighty merge` does), merge, then re-quantize")
        if not self.merged:
            self.weight.add_(self.delta().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def dequantize_base(self) -> None:
        """Replace a quantized base by its float dequantization (so that the adapter can be merged)."""
        if self.base_layer is not None:
            base, self.base_layer = self.base_layer, None
            self.weight = nn.Parameter(base.dequantize(), requires_grad=False)
            self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().float(), requires_grad=False)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta().to(self.weight.dtype))
            self.merged = False


class _LoRAProduct(torch.autograd.Function):
    """y = x W^T (+ b) + s (x A^T) B^T for training, with the gradients written where autograd would add them:
    x's gradient is gy W with (s gy B) A added in place (autograd builds both products and a third tensor for their
    sum: three (tokens, in) buffers, two passes over them), and only the gradients that are asked for. Measured in
    steady state (SmolLM2-135M's shape, r 8 on all seven projections, 4 x 256 tokens, 2-core AMD EPYC, alternated
    in one process): a whole LoRA step 0.97x the time. Used for a plain weight (any dtype) without dropout while a
    gradient is wanted; autocast, a quantized base and dropout take the module's eager path."""

    @staticmethod
    def applies(x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scaling, ctx.lead = scaling, x.shape[:-1]
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, xa, weight, a, b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        gy = gy.reshape(-1, gy.shape[-1])
        gxa = (gy @ b).mul_(ctx.scaling) if need_x or need_a else None
        gx = (gy @ weight).addmm_(gxa, a).view(*ctx.lead, -1) if need_x else None
        gw = gy.t() @ x2 if need_w else None
        gbias = gy.sum(0) if need_bias else None
        ga = gxa.t() @ x2 if need_a else None
        gb = (gy.t() @ xa).mul_(ctx.scaling) if need_b else None
        return gx, gw, gbias, ga, gb, None


def _linear_leaves(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers LoRA can wrap: nn.Linear, and quantized linears (anything with `dequantize()`)."""
    return {name: m for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or hasattr(m, "dequantize")) and not name.endswith(("lora_A", "lora_B"))
            and not name.endswith(".base_layer")}


def apply_lora(model: nn.Module, targets=("q_proj", "v_proj"), r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Wrap every linear layer whose leaf name is in `targets` (e.g. "lm_head" too; a family's own names such as
    Phi-2's fc1 or Phi-3's qkv_proj are taken too, names.LEAF_ALIASES) with LoRA, and return the converted module
    names (`adapters.mark_trainable` decides what trains)."""
    if r < 1:
        raise AdapterError(f"LoRA rank r must be >= 1, got {r}")
    if alpha <= 0 or not 0 <= dropout < 1:
        raise AdapterError(f"need alpha > 0 and 0 <= dropout < 1, got alpha={alpha}, dropout={dropout}")
    if any(getattr(m, "fused_qkv", None) or getattr(m, "fused_gate_up", None) for m in model.modules()):
        raise AdapterError("the model has fused projections (fuse_projections_); apply LoRA before fusing, "
                           "or call fuse.unfuse_projections_ first")
    config = getattr(model, "config", None)
    targets = our_leaves(config.arch, targets) if config is not None else tuple(targets)
    leaves = _linear_leaves(model)
    known = sorted({name.rsplit(".", 1)[-1] for name in leaves})
    unknown = [t for t in targets if t not in known]
    if unknown or not targets:
        raise AdapterError(f"unknown LoRA target module(s) {unknown or '(none given)'}; this model has: {', '.join(known)}")
    converted = []
    for name, module in leaves.items():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, LoRALinear):
            continue  # already converted
        if r > min(module.in_features, module.out_features):
            raise AdapterError(f"rank {r} exceeds the size of {name} ({module.out_features}x{module.in_features})")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(module, r, alpha, dropout, rslora)
        lora.train(module.training)  # a new module starts in training mode: keep the model's (eval: no dropout)
        setattr(parent, child, lora)
        converted.append(name)
    model.record_transform("lora", targets=list(targets), modules=converted)  # r, alpha, dropout: in the modules
    return converted


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (outputs unchanged); returns how many."""
    modules = lora_modules(model)
    for m in modules.values():
        m.merge()
    return len(modules)


def strip_lora(model: nn.Module) -> None:
    """Merge, then put plain nn.Linear modules back (what a merged checkpoint saves)."""
    merge_lora(model)
    for name, m in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    model.forget_transform("lora")


def _dropout(m: LoRALinear) -> float:
    return m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0


def _hf_module(name: str, arch: str) -> str:
    hf = rename(name + ".weight", ours_to_hf(arch))
    if hf is None:
        raise AdapterError(f"module {name} has no Hugging Face name")
    return hf.removesuffix(".weight")


def save_lora(model: nn.Module, path: str | Path, base_model: str = "") -> Path:
    """Write the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise AdapterError("the model has no LoRA modules to save")
    settings = {(m.r, m.alpha, m.rslora, _dropout(m)) for m in modules.values()}  # read from the modules
    if len(settings) > 1:
        raise AdapterError(f"the model's LoRA modules differ in rank, alpha or dropout ({sorted(settings)}); PEFT's "
                           "format holds one setting: apply LoRA once")
    r, alpha, rslora, dropout = settings.pop()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in modules.items():
        hf = PEFT_PREFIX + _hf_module(name, model.config.arch)
        tensors[f"{hf}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{hf}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    tensors, patterns = _stack_fused_lora(tensors, model.config, scaling, rslora)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
        # the Hugging Face leaf names (Phi-2's dense/fc1/fc2, Phi-3's stacked qkv_proj/gate_up_proj), which PEFT finds
        "target_modules": sorted({key.removeprefix(PEFT_PREFIX).rpartition(".lora_")[0].rpartition(".")[2]
                                  for key in tensors}),
        "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True, **patterns,
    }
    record = model.quantization
    if record:  # QLoRA: the base these adapters were trained over, so loading can rebuild it
        config["mightylm_base_quantization"] = record
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_lora(model: nn.Module, path: str | Path, cfg: dict | None = None) -> tuple[dict, dict[str, dict]]:
    """(config, {our module name: {"lora_A": tensor, "lora_B": tensor}}) of a PEFT-format LoRA adapter,
    checked against `model`'s modules and shapes; the model is not changed."""
    path = Path(path)
    cfg, tensors = read_adapter(path, ("LORA",), cfg)
    weights_file = path / "adapter_model.safetensors"
    targets = cfg["target_modules"]
    cfg["target_modules"] = [targets] if isinstance(targets, str) else targets
    leaves = dict(model.named_modules())
    ours: dict[str, dict] = {}
    for key, tensor in _split_fused_lora(tensors, model.config, cfg["r"]).items():
        module, _, which = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        which = "lora_" + which.replace(".default", "").split(".")[0]
        name = rename(module + ".weight", hf_to_ours(model.config.arch))
        if name is None:
            raise AdapterError(f"{weights_file}: tensor {key!r} names no module of a {model.config.arch} model")
        name = name.removesuffix(".weight")
        if name not in leaves:
            raise AdapterError(f"{weights_file}: adapter for {name}, which this model does not have "
                               f"(made for another base model? it has {model.config.n_layers} layers)")
        base = leaves[name]
        r = cfg["r"]
        want = (r, base.in_features) if which == "lora_A" else (base.out_features, r)
        if tuple(tensor.shape) != want:
            made_for = cfg.get("base_model_name_or_path") or "its base model"
            raise AdapterError(f"{weights_file}: {name}.{which} has shape {tuple(tensor.shape)}, this model needs "
                               f"{want}: the adapter was made for {made_for}, not for this "
                               f"{model.config.arch} model (dim {model.config.dim})")
        ours.setdefault(name, {})[which] = tensor
    incomplete = [n for n, pair in ours.items() if len(pair) != 2]
    if incomplete or not ours:
        raise AdapterError(f"{weights_file}: no lora_A/lora_B pair for {incomplete[:3] or 'any module'}")
    return cfg, ours


def _stack_fused_lora(tensors: dict, config, scaling: float, rslora: bool) -> tuple[dict, dict]:
    """The inverse of _split_fused_lora for saving: adapters on our separate q/k/v (gate/up) layers of a family that
    stores them stacked (Phi-3) become one adapter of rank n * r on the stacked layer, A the parts' A's stacked and B
    block-diagonal (a part without an adapter contributes zeros), the same update exactly. PEFT's rank_pattern and
    alpha_pattern give those layers their rank and an alpha that keeps the scaling."""
    from mightylm.checkpoint.names import FUSED_HF

    fused = FUSED_HF.get(config.arch, {})
    if not fused:
        return tensors, {}
    rows, patterns = projection_rows(config), {"rank_pattern": {}, "alpha_pattern": {}}
    layers = sorted({key.removeprefix(PEFT_PREFIX).partition(".layers.")[2].partition(".")[0] for key in tensors
                     if ".layers." in key})
    for layer in layers:
        prefix = f"{PEFT_PREFIX}model.layers.{layer}."
        for stacked, parts in fused.items():
            keys = [(f"{prefix}{p}.lora_A.weight", f"{prefix}{p}.lora_B.weight") for p in parts]
            present = [(a, b) for a, b in keys if a in tensors]
            if not present:
                continue
            r, dim = tensors[present[0][0]].shape
            As, Bs = [], []
            for (a, b), part in zip(keys, parts):
                As.append(tensors.pop(a) if a in tensors else torch.zeros(r, dim))
                Bs.append(tensors.pop(b) if b in tensors else torch.zeros(rows[part.rpartition(".")[2]], r))
            tensors[f"{prefix}{stacked}.lora_A.weight"] = torch.cat(As).contiguous()
            tensors[f"{prefix}{stacked}.lora_B.weight"] = torch.block_diag(*Bs).contiguous()
            rank = r * len(parts)
            leaf = stacked.rpartition(".")[2]
            patterns["rank_pattern"][leaf] = rank
            patterns["alpha_pattern"][leaf] = scaling * (math.sqrt(rank) if rslora else rank)
    return tensors, patterns


def _split_fused_lora(tensors: dict, config, r: int) -> dict:
    """An adapter on a layer the family stores stacked (Phi-3's qkv_proj, gate_up_proj) as adapters of rank r on our
    separate layers, the same update exactly: one of rank r (PEFT's) gives each part the whole A and its rows of B;
    one of rank n * r with a block-diagonal B (ours, _stack_fused_lora) gives each part its own A and B block."""
    out, sizes = {}, projection_rows(config)
    for key, tensor in tensors.items():
        module, _, rest = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        parts = fused_parts(config.arch, module, sizes)
        if parts is None:
            out[key] = tensor
            continue
        if not rest.startswith("A"):
            continue  # taken with its A below
        a, b = tensor, tensors.get(f"{PEFT_PREFIX}{module}.lora_B{rest[1:]}")
        if b is None:
            raise AdapterError(f"{module}: a lora_A without its lora_B")
        rows = [n for _, n in parts]
        if a.shape[0] == r:
            pairs = [(a, piece) for piece in b.split(rows)]
        elif a.shape[0] == r * len(parts) and torch.equal(torch.block_diag(*[blk[:, i * r:(i + 1) * r] for i, blk in
                                                                             enumerate(b.split(rows))]), b):
            pairs = [(a[i * r:(i + 1) * r], piece[:, i * r:(i + 1) * r]) for i, piece in enumerate(b.split(rows))]
        else:
            raise AdapterError(f"{module}: a LoRA of rank {a.shape[0]} on a stacked layer (rank {r} expected, or "
                               f"{r * len(parts)} with a block-diagonal B); per-layer ranks are not supported")
        for (part, _), (pa, pb) in zip(parts, pairs):
            out[f"{PEFT_PREFIX}{part}.lora_{rest}"] = pa.clone()
            out[f"{PEFT_PREFIX}{part}.lora_B{rest[1:]}"] = pb.clone()
    return out


def lora_scaling(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora", False) else alpha / r


def load_lora(model: nn.Module, path: str | Path, cfg: dict | None = None) -> list[str]:
    """Apply a PEFT-format LoRA adapter (ours or PEFT's) to `model`, unmerged. Returns converted names."""
    cfg = read_adapter_config(path) if cfg is None else cfg
    quantized = cfg.get("mightylm_base_quantization")
    if quantized and not model.quantization:  # a QLoRA adapter: rebuild its NF4 base first
        from mightylm.compress.quantize import quantize_like_

        quantize_like_(model, quantized)
    cfg, ours = read_lora(model, path, cfg)
    return apply_pairs(model, cfg, ours, Path(path) / "adapter_model.safetensors")


def apply_pairs(model: nn.Module, cfg: dict, ours: dict[str, dict], source: Path) -> list[str]:
    """Apply LoRA (cfg's r, alpha, targets) and set each module's A and B from `ours` ({module: {lora_A, lora_B}},
    read from `source`). Returns converted names."""
    converted = apply_lora(model, tuple(cfg["target_modules"]), r=cfg["r"], alpha=cfg["lora_alpha"],
                           dropout=cfg.get("lora_dropout", 0.0), rslora=cfg.get("use_rslora", False))
    modules = lora_modules(model)
    missing = [n for n in converted if n not in ours]
    if missing:
        raise AdapterError(f"{source}: no weights for {missing[:3]}")
    with torch.no_grad():
        for name, pair in ours.items():
            for which, tensor in pair.items():
                getattr(modules[name], which).weight.copy_(tensor)
    return converted
