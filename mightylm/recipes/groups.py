"""Option groups the training verbs share, each a dataclass (`--lora.r 4`, or in a recipe `lora: {r: 4}`).

A group's option may also be given without the group's name (`--r 4`) where no other option of the verb
has that name (the CLI rewrites it). Python callers pass the dataclasses: `finetune_lora(..., lora=LoRA(r=4))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mightylm.errors import UsageError
from mightylm.options import Fraction, PositiveFloat, PositiveInt

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class SFTData:
    """How the instruction or chat JSONL (--data) becomes training and validation sequences.

    Args:
        val_data: JSONL for validation; if unset, `val_fraction` of `data` is held out.
        val_fraction: Share of `data` held out for validation when `val_data` is unset.
        max_len: Longest example in tokens (longer ones are cut).
        pack: Pack several examples into each sequence instead of padding.
    """

    val_data: str | None = None
    val_fraction: Fraction = 0.05
    max_len: PositiveInt = 512
    pack: bool = False

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise UsageError(f"--sft.val_fraction must be from 0 up to (not including) 1, got {self.val_fraction}")
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1:
            raise UsageError(f"--sft.max_len must be at least 1, got {self.max_len}")


@dataclass(frozen=True)
class Router:
    """The router losses a mixture-of-experts model trains with (ignored for dense models).

    Args:
        balance: per_layer (Switch balancing per layer, averaged: 1.0 when balanced), hf (transformers' loss, which
            pools all layers' statistics first and reads k when balanced), or off.
        aux_coef: Weight of the balancing loss.
        z_coef: Weight of the router z-loss (ST-MoE: mean logsumexp(router logits)^2; keeps the logits small).
    """

    balance: Literal["per_layer", "hf", "off"] = "per_layer"
    aux_coef: float = 0.01
    z_coef: float = 0.001

    def __post_init__(self):
        if self.aux_coef < 0 or self.z_coef < 0:
            raise UsageError(f"--router.aux_coef and --router.z_coef must be >= 0, got {self.aux_coef}, {self.z_coef}")


@dataclass(frozen=True)
class LoRA:
    """The low-rank update (Hu et al. 2021): W + (alpha / r) B A on each targeted layer.

    Args:
        targets: Leaf names of the linear layers to adapt (add lm_head to adapt the head too); unset: every
            attention and feed-forward projection the model has (q/k/v/o_proj, gate/up/down_proj; with experts,
            theirs too).
        r: Rank of the update.
        alpha: Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
        dropout: Dropout on the adapter's input during training.
        rslora: Use rank-stabilised scaling alpha / sqrt(r).
    """

    targets: list[str] | None = None
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Fraction = 0.05
    rslora: bool = False

    def settings(self, model) -> dict:
        """The keyword arguments of `apply_lora` for `model`."""
        targets = self.targets
        if targets is None:
            leaves = {name.rpartition(".")[2] for name, _ in model.named_modules()}
            targets = [t for t in ALL_PROJECTIONS if t in leaves]
        return {"targets": tuple(targets), "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "rslora": self.rslora}


@dataclass(frozen=True)
class NF4:
    """The frozen 4-bit NormalFloat base of QLoRA (Dettmers et al. 2023).

    Args:
        block_size: Weights sharing one absmax.
        double_quant: Quantize the absmax constants too (8-bit, blocks of 256): 4.127 instead of 4.5 bits per weight.
    """

    block_size: PositiveInt = 64
    double_quant: bool = True


@dataclass(frozen=True)
class SoftPrompt:
    """Virtual tokens placed before every sequence (prompt tuning, P-tuning).

    Args:
        n_tokens: Number of virtual tokens.
        init_text: Start from the embeddings of this text's tokens (cycled to n_tokens); if unset, from
            the embeddings of randomly drawn vocabulary tokens.
    """

    n_tokens: PositiveInt = 20
    init_text: str | None = None
