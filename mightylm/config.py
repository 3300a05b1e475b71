"""Model configuration: one flat dataclass for the Llama family, named presets, and config.json I/O.

A `ModelConfig` holds only architectural facts. Branches in `model.py` exist for exactly the axes
named here: grouped-query attention (`n_kv_heads`), tied embeddings, RoPE scaling, partial rotary
embeddings (Phi-3 / Phi-4-mini, Phi-2), q/k/v bias (Qwen2, Phi-2), sliding-window attention (Mistral, Phi-3),
Phi-2's LayerNorm, parallel attention + MLP, GELU MLP and output/head biases, q/k RMSNorm and q/k/v clipping
(OLMoE), and sparse
mixture-of-experts feed-forwards (`n_experts` > 0: Mixtral, Qwen2-MoE, OLMoE; see moe.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mightylm.errors import MightyError, UsageError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi", "phi3", "mixtral", "qwen2_moe", "olmoe")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "olmoe")
REQUIRED = object()
# Each RoPE scaling type's settings (transformers' names) with their defaults; REQUIRED ones must be given.
# model.ROPE_SCALINGS computes each; `original_max_position_embeddings` is the length the model was trained at.
ROPE_SCALING_KEYS = {
    "linear": {"factor": REQUIRED},
    "dynamic": {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED},
    "yarn": {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED, "attention_factor": None,
             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None, "truncate": True},
    "llama3": {"factor": REQUIRED, "low_freq_factor": REQUIRED, "high_freq_factor": REQUIRED,
               "original_max_position_embeddings": REQUIRED},
    "longrope": {"short_factor": REQUIRED, "long_factor": REQUIRED, "original_max_position_embeddings": REQUIRED,
                 "factor": None, "attention_factor": None},
}
ROPE_SCALING_TYPES = (None, *ROPE_SCALING_KEYS)


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
    # None, or {"type": one of ROPE_SCALING_KEYS, its settings}; missing optional settings are filled in
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 adds a bias to q, k and v projections
    sliding_window: int | None = None  # Mistral: attend to at most this many previous positions
    max_seq_len: int = 4096
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * this of each head's dimensions
    # Phi-1.5 / Phi-2: LayerNorm (with bias) instead of RMSNorm, attention and MLP side by side from one norm
    # (x + attn(n(x)) + mlp(n(x))), a GELU MLP (up, gelu, down, with biases), biases on o_proj and the head
    norm: Literal["rms", "layer"] = "rms"
    parallel_block: bool = False
    mlp_act: Literal["swiglu", "gelu"] = "swiglu"
    o_bias: bool = False
    head_bias: bool = False
    # OLMoE: RMSNorm over the whole q and k projections (before the heads split), and q/k/v clamped to +-clip_qkv
    qk_norm: bool = False
    clip_qkv: float | None = None
    # Sparse mixture of experts (moe.py): n_experts > 0 makes the feed-forward of the sparse layers a router over
    # that many SwiGLU experts of expert_ffn_dim (None: ffn_dim), each token sent to experts_per_token of them.
    n_experts: int = 0
    experts_per_token: int = 2
    expert_ffn_dim: int | None = None
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1 (Mixtral yes, Qwen2-MoE/OLMoE no)
    shared_expert_ffn_dim: int | None = None  # Qwen2-MoE: an always-on expert of this size behind a sigmoid gate
    decoder_sparse_step: int = 1  # Qwen2-MoE: layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here

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
        self.rope_scaling = _checked_rope_scaling(self.rope_scaling, self.rotary_dim if self.head_dim else None)
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ConfigError(f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and give an even "
                              f"number of rotated dimensions (head_dim {self.head_dim} x it = {self.rotary_dim})")
        if isinstance(self.n_experts, bool) or not isinstance(self.n_experts, int) or self.n_experts < 0 \
                or self.n_experts == 1:
            raise ConfigError(f"n_experts must be 0 (a dense model) or at least 2, got {self.n_experts!r}")
        if self.n_experts:
            if not 1 <= self.experts_per_token <= self.n_experts:
                raise ConfigError(f"experts_per_token (top-k) must be between 1 and n_experts={self.n_experts}, "
                                  f"got {self.experts_per_token}")
            if self.decoder_sparse_step < 1:
                raise ConfigError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        elif self.arch in MOE_MODEL_TYPES:
            raise ConfigError(f"a {self.arch} model needs n_experts >= 2")

    @property
    def rotary_dim(self) -> int:
        """The leading dimensions of each head that RoPE rotates (all of them unless partial_rotary_factor < 1)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def sparse_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` has a mixture-of-experts feed-forward (Qwen2-MoE's rule; every layer for
        Mixtral and OLMoE)."""
        return (self.n_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @property
    def active_params(self) -> int:
        """Parameters a token passes through (the chosen experts only), counting a tied embedding once."""
        return self._count(active=True)
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
        return self._count(active=False)

    def _count(self, active: bool) -> int:
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += self.head_dim * (self.n_heads + self.n_kv_heads)
        if self.o_bias:
            attn += self.dim
        norm = self.dim * (2 if self.norm == "layer" else 1)
        total = 0
        for i in range(self.n_layers):
            if self.sparse_layer(i):
                experts = self.experts_per_token if active else self.n_experts
                ffn = experts * 3 * self.dim * (self.expert_ffn_dim or self.ffn_dim) + self.n_experts * self.dim
                if self.shared_expert_ffn_dim:
                    ffn += 3 * self.dim * self.shared_expert_ffn_dim + self.dim
            elif self.mlp_act == "gelu":
                ffn = 2 * self.dim * self.ffn_dim + self.ffn_dim + self.dim
            else:
                ffn = 3 * self.dim * self.ffn_dim
            total += attn + ffn + norm * (1 if self.parallel_block else 2)
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim + (self.vocab_size if self.head_bias else 0)
        return self.vocab_size * self.dim + total + norm + head

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
            params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
            partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
            if model_type in ("qwen2", "qwen2_moe") and not hf.get("use_sliding_window", False):
                sliding = None
            return cls(
                **_moe_from_hf(model_type, hf),
                arch=model_type,
                vocab_size=hf["vocab_size"],
                dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                ffn_dim=hf["intermediate_size"],
                head_dim=hf.get("head_dim"),
                norm_eps=hf.get("rms_norm_eps", hf.get("layer_norm_eps", 1e-6)),
                rope_theta=_rope_theta_from_hf(hf),
                rope_scaling=rope_scaling,
                tie_embeddings=hf.get("tie_word_embeddings", model_type == "qwen2"),
                qkv_bias=(model_type in ("qwen2", "phi") or bool(hf.get("attention_bias", False))
                          or (model_type == "qwen2_moe" and hf.get("qkv_bias", True))),
                sliding_window=sliding,
                # dynamic NTK's max_position_embeddings is the trained length; the context it reaches is factor x
                max_seq_len=int(rope_scaling["factor"] * rope_scaling["original_max_position_embeddings"])
                if rope_scaling and rope_scaling["type"] == "dynamic" else hf.get("max_position_embeddings", 4096),
                partial_rotary_factor=partial,
                **_phi_from_hf(model_type, hf),
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
            "max_position_embeddings": self.rope_scaling["original_max_position_embeddings"]
            if self.rope_scaling and self.rope_scaling["type"] == "dynamic" else self.max_seq_len,
            "hidden_act": "gelu_new" if self.mlp_act == "gelu" else "silu",
            "torch_dtype": "float32",
        }
        if self.arch == "phi":
            hf.update(layer_norm_eps=self.norm_eps, qk_layernorm=False)
            del hf["rms_norm_eps"]
        if self.arch == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        if self.arch in ("mistral", "phi3"):
            hf["sliding_window"] = self.sliding_window
        if self.partial_rotary_factor != 1.0:
            hf["partial_rotary_factor"] = self.partial_rotary_factor
            if hf["rope_scaling"] is None:
                hf["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta,
                                         "partial_rotary_factor": self.partial_rotary_factor}
        if self.arch == "phi3":
            hf["pad_token_id"] = None  # Phi3Config's default (32000) is outside a small vocabulary
        if self.arch in ("qwen2", "qwen2_moe"):
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
        if self.arch == "mixtral":
            hf.update(sliding_window=self.sliding_window, num_local_experts=self.n_experts,
                      num_experts_per_tok=self.experts_per_token, intermediate_size=self.expert_ffn_dim or self.ffn_dim)
        if self.arch == "qwen2_moe":
            hf.update(num_experts=self.n_experts, num_experts_per_tok=self.experts_per_token,
                      moe_intermediate_size=self.expert_ffn_dim or self.ffn_dim, norm_topk_prob=self.norm_topk_prob,
                      shared_expert_intermediate_size=self.shared_expert_ffn_dim or 0,
                      decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                      qkv_bias=self.qkv_bias)
        if self.arch == "olmoe":
            hf.update(num_experts=self.n_experts, num_experts_per_tok=self.experts_per_token,
                      intermediate_size=self.expert_ffn_dim or self.ffn_dim, norm_topk_prob=self.norm_topk_prob,
                      clip_qkv=self.clip_qkv, attention_bias=self.qkv_bias)
        return hf


_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
                     "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


# Phi-1.5 / Phi-2's architecture axes, from a config.json or a GGUF file alike
PHI_AXES = dict(norm="layer", parallel_block=True, mlp_act="gelu", o_bias=True, head_bias=True)


def _phi_from_hf(model_type: str, hf: dict) -> dict:
    """Phi-1.5 / Phi-2's axes (empty for the other types). Refuses what we do not build: q/k LayerNorms."""
    if model_type != "phi":
        return {}
    if hf.get("qk_layernorm"):
        raise ConfigError("phi with qk_layernorm is not supported (no released Phi checkpoint uses it)")
    if hf.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"phi with hidden_act {hf.get('hidden_act')!r} is not supported; supported: gelu_new")
    return dict(PHI_AXES)


def _moe_from_hf(model_type: str, hf: dict) -> dict:
    """The mixture-of-experts fields of a Mixtral, Qwen2-MoE or OLMoE config.json (empty for dense types)."""
    if model_type == "mixtral":
        return dict(n_experts=hf.get("num_local_experts", 8), experts_per_token=hf.get("num_experts_per_tok", 2),
                    norm_topk_prob=True)
    if model_type == "qwen2_moe":
        shared = hf.get("shared_expert_intermediate_size") or None
        return dict(n_experts=hf.get("num_experts", 60), experts_per_token=hf.get("num_experts_per_tok", 4),
                    expert_ffn_dim=hf.get("moe_intermediate_size", 1408), norm_topk_prob=hf.get("norm_topk_prob", False),
                    shared_expert_ffn_dim=shared, decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                    mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()))
    if model_type == "olmoe":
        return dict(n_experts=hf.get("num_experts", 64), experts_per_token=hf.get("num_experts_per_tok", 8),
                    norm_topk_prob=hf.get("norm_topk_prob", False), qk_norm=True, clip_qkv=hf.get("clip_qkv"))
    return {}


def _rope_theta_from_hf(hf: dict) -> float:
    # transformers 5 moved rope_theta into `rope_parameters`; accept both spellings.
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _checked_rope_scaling(scaling: dict | None, rotary_dim: int | None) -> dict | None:
    """The scaling with its optional settings filled in, or a ConfigError that says what is wrong."""
    if not scaling or scaling.get("type") is None:
        if scaling and set(scaling) - {"type"}:
            raise ConfigError(f"rope scaling {scaling} has no type; supported: {', '.join(ROPE_SCALING_KEYS)}")
        return None
    kind = scaling["type"]
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"unsupported rope scaling {kind!r}; supported: {', '.join(ROPE_SCALING_KEYS)}")
    keys = ROPE_SCALING_KEYS[kind]
    unknown = set(scaling) - set(keys) - {"type"}
    if unknown:
        raise ConfigError(f"rope scaling {kind!r} does not take {', '.join(sorted(unknown))}; it takes "
                          f"{', '.join(keys)}")
    missing = [k for k, default in keys.items() if default is REQUIRED and scaling.get(k) is None]
    if missing:
        raise ConfigError(f"rope scaling {kind!r} needs {', '.join(missing)}")
    out = {"type": kind, **{k: scaling.get(k, None if default is REQUIRED else default) for k, default in keys.items()}}
    for key in ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "low_freq_factor", "high_freq_factor"):
        value = out.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"rope scaling {kind!r}: {key} must be a positive number, got {value!r}")
        if value is not None:
            out[key] = float(value)
    if out.get("original_max_position_embeddings") is not None:
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            out[key] = [float(x) for x in out[key]]
            if rotary_dim is not None and len(out[key]) != rotary_dim // 2:
                raise ConfigError(f"rope scaling 'longrope': {key} has {len(out[key])} entries; the rotary "
                                  f"dimension {rotary_dim} needs {rotary_dim // 2} (one per frequency)")
    return out


def parse_rope_scaling(spec: str | dict | None, trained_len: int) -> dict | None:
    """A scaling from its command-line spelling, TYPE:FACTOR for linear, dynamic and yarn ("yarn:4"), with
    `trained_len` as the original length; a dict passes through (checked). "none" (or None) is no scaling."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, dict):
        return _checked_rope_scaling(spec, None)
    kind, _, factor = spec.partition(":")
    if kind not in ("linear", "dynamic", "yarn"):
        raise ConfigError(f"--rope-scaling {spec}: write linear:F, dynamic:F or yarn:F (F > 1, the context over the "
                          f"trained length); {', '.join(k for k in ROPE_SCALING_KEYS if k not in ('linear', 'dynamic', 'yarn'))} "
                          "take per-model settings from a config")
    try:
        value = float(factor)
    except ValueError:
        raise ConfigError(f"--rope-scaling {spec}: the factor after ':' must be a number") from None
    if not value > 1:
        raise ConfigError(f"--rope-scaling {spec}: a factor must exceed 1 to extend the context (got {value:g})")
    scaling = {"type": kind, "factor": value}
    if kind != "linear":
        scaling["original_max_position_embeddings"] = trained_len
    return _checked_rope_scaling(scaling, None)


def _rope_scaling_from_hf(hf: dict) -> dict | None:
    """Our rope_scaling from a config.json's `rope_scaling` (`type` or `rope_type`) or transformers 5's
    `rope_parameters`, the trained length filled in as transformers does: a top-level
    `original_max_position_embeddings` first (Phi-3), then the scaling's own, then max_position_embeddings
    (which dynamic NTK always takes)."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"rope scaling type {kind!r} is not supported; supported: default, "
                          f"{', '.join(ROPE_SCALING_KEYS)}")
    out = {"type": kind, **{k: scaling[k] for k in ROPE_SCALING_KEYS[kind] if scaling.get(k) is not None}}
    trained = hf.get("max_position_embeddings", 4096)
    if kind == "dynamic":
        out["original_max_position_embeddings"] = trained
    elif kind in ("yarn", "llama3", "longrope"):
        out["original_max_position_embeddings"] = hf.get("original_max_position_embeddings") or \
            out.get("original_max_position_embeddings") or trained
    return out


def _rope_scaling_to_hf(scaling: dict | None) -> dict | None:
    if scaling is None:
        return None
    out = {k: v for k, v in scaling.items() if k != "type" and v is not None}
    if scaling["type"] == "dynamic":  # transformers takes the trained length from max_position_embeddings
        del out["original_max_position_embeddings"]
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
    # Mixture-of-experts shapes: the real ones for size and memory estimates, a tiny one for tests.
    "tiny-moe": ModelConfig(arch="mixtral", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                            max_seq_len=256, n_experts=4, experts_per_token=2),
    "mixtral-8x7b": ModelConfig(
        arch="mixtral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        rope_theta=1e6, max_seq_len=32768, n_experts=8, experts_per_token=2,
    ),
    "qwen1.5-moe-a2.7b": ModelConfig(
        arch="qwen2_moe", vocab_size=151936, dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5632,
        rope_theta=1e6, qkv_bias=True, max_seq_len=8192, n_experts=60, experts_per_token=4, expert_ffn_dim=1408,
        norm_topk_prob=False, shared_expert_ffn_dim=5632,
    ),
    "olmoe-1b-7b": ModelConfig(
        arch="olmoe", vocab_size=50304, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_dim=1024,
        max_seq_len=4096, qk_norm=True, n_experts=64, experts_per_token=8, norm_topk_prob=False,
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
