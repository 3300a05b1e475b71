"""Model configuration: one flat dataclass for the Llama family, named presets, and config.json I/O.

A `ModelConfig` holds only architectural facts. Branches in `model.py` exist for exactly the axes
named here: grouped-query attention (`n_kv_heads`), tied embeddings, RoPE scaling, q/k/v bias
(Qwen2) and sliding-window attention (Mistral).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from mightylm.errors import MightyError, UsageError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_SCALING_TYPES = (None, "linear", "llama3")


class ConfigError(MightyError, ValueError):
    """A config.json or preset we cannot turn into a model; the message says which and why."""


@dataclass
class ModelConfig:
    arch: str = "llama"  # the Hugging Face `model_type` this checkpoint round-trips as
    vocab_size: int = 32000
    dim: int = 4096  # hidden size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (plain multi-head attention)
    ffn_dim: int = 11008  # SwiGLU intermediate size
    head_dim: int | None = None  # None means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"type": "linear", "factor": f}, or {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1 paper, section 3.3 code).
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 adds a bias to q, k and v projections
    sliding_window: int | None = None  # Mistral: attend to at most this many previous positions
    max_seq_len: int = 4096

    def __post_init__(self):
        sizes = ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len")
        bad = [f"{k}={getattr(self, k)!r}" for k in sizes + ("n_kv_heads", "head_dim", "sliding_window")
               if (getattr(self, k) is not None or k in sizes)
               and (isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int) or getattr(self, k) < 1)]
        if bad:
            raise ConfigError(f"model sizes must be positive integers, got {', '.join(bad)}")
        bad = [f"{k}={getattr(self, k)!r}" for k in ("norm_eps", "rope_theta") if isinstance(getattr(self, k), bool)
               or not isinstance(getattr(self, k), (int, float)) or not getattr(self, k) > 0]
        if bad:
            raise ConfigError(f"norm_eps and rope_theta must be positive numbers, got {', '.join(bad)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.arch not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported arch {self.arch!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        rope_type = (self.rope_scaling or {}).get("type")
        if rope_type not in ROPE_SCALING_TYPES:
            raise ConfigError(f"unsupported rope scaling {rope_type!r}; supported: none, linear, llama3")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        if ("dim" in overrides or "n_heads" in overrides) and "head_dim" not in overrides:
            overrides["head_dim"] = None  # re-derive from the new shape
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def n_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * layer + self.dim + head

    # ---- Hugging Face config.json ----

    @classmethod
    def from_hf(cls, hf: dict | str | Path) -> "ModelConfig":
        """Build from a Hugging Face config (a dict, a config.json path or a model directory)."""
        source = "config"
        if not isinstance(hf, dict):
            path = Path(hf)
            path = path / "config.json" if path.is_dir() else path
            source = str(path)
            if not path.exists():
                raise ConfigError(f"{path}: not found; a Hugging Face model directory needs a config.json")
            try:
                hf = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{path}: not UTF-8 text; a config.json is UTF-8 JSON") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object with the model's settings, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            rope_scaling = _rope_scaling_from_hf(hf)
            sliding = hf.get("sliding_window")
            if model_type == "qwen2" and not hf.get("use_sliding_window", False):
                sliding = None
            return cls(
                arch=model_type,
                vocab_size=hf["vocab_size"],
                dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                ffn_dim=hf["intermediate_size"],
                head_dim=hf.get("head_dim"),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=_rope_theta_from_hf(hf),
                rope_scaling=rope_scaling,
                tie_embeddings=hf.get("tie_word_embeddings", model_type == "qwen2"),
                qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
                sliding_window=sliding,
                max_seq_len=hf.get("max_position_embeddings", 4096),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            if isinstance(e, ConfigError):
                raise ConfigError(f"{source}: {e}") from None
            raise ConfigError(f"{source}: a field has the wrong type or value ({e})") from None

    def to_hf(self) -> dict:
        """The config.json that `transformers` reads back into the same architecture."""
        hf = {
            "architectures": [_HF_ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.ffn_dim,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": _rope_scaling_to_hf(self.rope_scaling),
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.arch == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        if self.arch == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.arch == "qwen2":
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
        return hf


_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _rope_theta_from_hf(hf: dict) -> float:
    # transformers 5 moved rope_theta into `rope_parameters`; accept both spellings.
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_scaling_from_hf(hf: dict) -> dict | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        return {
            "type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
    raise ConfigError(f"rope scaling type {kind!r} is not supported; supported: default, linear, llama3")


def _rope_scaling_to_hf(scaling: dict | None) -> dict | None:
    if scaling is None:
        return None
    out = {k: v for k, v in scaling.items() if k != "type"}
    return {"rope_type": scaling["type"], **out}


PRESETS: dict[str, ModelConfig] = {
    # Tiny shapes for tests: every architectural axis exercised, runs in milliseconds.
    "tiny": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
    # ~15M parameters: the small benchmark shape. Its 63 MB of float32 weights no longer fit in
    # cache, so batch-1 decode here is bandwidth-bound as well as overhead-bound (bench/RESULTS.md).
    "micro-15m": ModelConfig(
        vocab_size=8192, dim=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=1024, tie_embeddings=True
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
        rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192,
    ),
    "smollm2-360m": ModelConfig(
        vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560,
        rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192,
    ),
    "qwen2.5-0.5b": ModelConfig(
        arch="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
        norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=True, qkv_bias=True, max_seq_len=32768,
    ),
    "tinyllama-1.1b": ModelConfig(
        vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        rope_theta=500000.0, tie_embeddings=True, max_seq_len=131072,
        rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "mistral-7b": ModelConfig(
        arch="mistral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        sliding_window=4096, max_seq_len=32768,
    ),
}


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run.

    Args:
        steps: Optimizer steps to train for.
        batch_size: Sequences per micro-batch (per process).
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate (reached after warm-up).
        min_lr: Learning rate at the end of the cosine decay.
        warmup: Linear warm-up steps.
        weight_decay: AdamW weight decay for matrices (norms and biases get none).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: Largest global gradient norm; null disables clipping.
        bf16: bfloat16 autocast (GPUs, and CPUs with AVX512-BF16 or AMX; elsewhere emulated, ~100x slower: a warning).
        activation_checkpointing: Recompute each block in backward instead of storing its activations.
        eval_every: Validate every this many steps (and at the end).
        eval_batches: Validation batches per evaluation; null for the whole validation set.
        save_every: Write a checkpoint every this many steps (and at the end).
        log_every: Write a metrics line every this many steps.
        seed: Seed for initialisation and data order.
        fsdp: Under torchrun, shard parameters with FSDP2 instead of replicating them with DDP.
    """

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    bf16: bool = False
    activation_checkpointing: bool = False
    eval_every: int = 100
    eval_batches: int | None = 50
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    fsdp: bool = False

    def __post_init__(self):
        """Refuse settings that would train on nothing or divide by zero, naming the option (--train.NAME)."""
        at_least_one = ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every")
        problems = [f"--train.{k} must be at least 1, got {getattr(self, k)}" for k in at_least_one
                    if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
        if self.eval_batches is not None and self.eval_batches < 1:
            problems.append(f"--train.eval_batches must be at least 1 (or null for all), got {self.eval_batches}")
        if not self.lr > 0:
            problems.append(f"--train.lr must be above 0, got {self.lr}")
        if self.min_lr < 0:
            problems.append(f"--train.min_lr must be 0 or more, got {self.min_lr}")
        if self.warmup < 0:
            problems.append(f"--train.warmup must be 0 or more, got {self.warmup}")
        if self.weight_decay < 0:
            problems.append(f"--train.weight_decay must be 0 or more, got {self.weight_decay}")
        problems += [f"--train.{k} must be from 0 up to (not including) 1, got {getattr(self, k)}"
                     for k in ("beta1", "beta2") if not 0 <= getattr(self, k) < 1]
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"--train.grad_clip must be above 0 (or null for none), got {self.grad_clip}")
        if not 0 <= self.seed < 2**63:
            problems.append(f"--train.seed must be from 0 to 2^63 - 1, got {self.seed}")
        if problems:
            raise UsageError("; ".join(problems))
