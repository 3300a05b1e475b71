"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): soft prompts.

Both learn P "virtual token" embeddings that enter the frozen model before every sequence:
- prompt tuning learns the P x dim embeddings directly;
- P-tuning produces them with a small prompt encoder (an MLP, or a bidirectional LSTM followed by
  an MLP, section 3.2 of Liu et al.) whose input embeddings and weights are what is trained.

How it hooks in: `apply_prompt_tuning(model, n_tokens=20, encoder="none"|"mlp"|"lstm")` sets
`model.prefix` (the model's seam for virtual tokens); `adapters.mark_trainable` freezes the rest. The model
places the virtual tokens after each row's left padding, keeps them in the KV cache, and returns
logits for the real tokens only, so the training loop and generation need no change.

Initialisation: from the embeddings of a text (`init_ids`: its tokens, repeated or cut to P, as
PEFT's TEXT init), or else from the embeddings of P tokens drawn from the vocabulary (Lester et
al. section 3.2 found both far better than random vectors). Footgun, and our one deviation from
PEFT: P-tuning here is residual, prompt = e + head(e) with the head's last layer zero-initialised,
so a text initialisation holds exactly at step 0; PEFT and the paper use head(e) alone, which
starts from the random output of an untrained MLP.

Files are PEFT's: adapter_config.json (peft_type PROMPT_TUNING or P_TUNING) and
adapter_model.safetensors with one tensor, `prompt_embeddings` (P, dim): the encoder's output, as
PEFT itself saves P-tuning. `peft.PeftModel.from_pretrained` loads ours, we load PEFT's, and both
give the same logits; the encoder weights themselves live in the training checkpoint (resume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mightylm.adapters.files import AdapterError, read_adapter

Encoder = Literal["none", "mlp", "lstm"]
PEFT_TYPES = {"none": "PROMPT_TUNING", "mlp": "P_TUNING", "lstm": "P_TUNING"}


class SoftPrompt(nn.Module):
    """() -> (P, dim) virtual-token embeddings: learned directly, or through an MLP/LSTM encoder."""

    def __init__(self, init: torch.Tensor, encoder: Encoder = "none", hidden: int = 256):
        super().__init__()
        self.n_tokens, dim = init.shape
        self.encoder, self.hidden = encoder, hidden
        self.embedding = nn.Parameter(init.detach().clone())  # (P, dim)
        self.lstm = None
        if encoder == "lstm":  # Liu et al.: bidirectional LSTM, then a two-layer MLP
            self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True,
                                device=init.device, dtype=init.dtype)
            widths = [2 * hidden, 2 * hidden, dim]
        elif encoder == "mlp":  # PEFT's MLP reparameterisation: three layers
            widths = [dim, hidden, hidden, dim]
        elif encoder != "none":
            raise AdapterError(f"unknown prompt encoder {encoder!r}; use none (prompt tuning), mlp or lstm")
        if encoder != "none":
            layers = []
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(a, b, device=init.device, dtype=init.dtype), nn.ReLU()]
            self.head = nn.Sequential(*layers[:-1])
            nn.init.zeros_(self.head[-1].weight)  # residual starts at zero: prompt == init at step 0
            nn.init.zeros_(self.head[-1].bias)

    def forward(self) -> torch.Tensor:
        if self.encoder == "none":
            return self.embedding
        e = self.embedding
        h = self.lstm(e[None])[0][0] if self.lstm is not None else e  # (P, 2*hidden) or (P, dim)
        return e + self.head(h)


def init_embeddings(model: nn.Module, n_tokens: int, init_ids: list[int] | None = None, seed: int = 0) -> torch.Tensor:
    """(P, dim) starting prompt: the embeddings of `init_ids` cycled to P tokens, or of P random vocabulary tokens."""
    if init_ids:
        ids = torch.tensor((init_ids * (n_tokens // len(init_ids) + 1))[:n_tokens])
    else:
        ids = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.embed(ids.to(model.device)).detach()


def apply_prompt_tuning(model: nn.Module, n_tokens: int = 20, *, encoder: Encoder = "none", hidden: int = 256,
                        init_ids: list[int] | None = None, init: torch.Tensor | None = None, seed: int = 0) -> SoftPrompt:
    """Give `model` P trainable virtual tokens (prompt tuning, or P-tuning with encoder mlp/lstm); what trains
    is decided by `adapters.mark_trainable`. `init` (P, dim) overrides the text/vocabulary initialisation. Returns the prompt module."""
    if model.prefix is not None:
        raise AdapterError(f"the model already has {model.prefix_len} virtual tokens; apply one soft prompt only")
    if n_tokens < 1 or n_tokens >= model.config.max_seq_len:
        raise AdapterError(f"the number of virtual tokens must be between 1 and the context "
                           f"({model.config.max_seq_len}) - 1, got {n_tokens}")
    if encoder != "none" and hidden < 1:
        raise AdapterError(f"the prompt encoder's hidden size must be >= 1, got {hidden}")
    if init is None:
        init = init_embeddings(model, n_tokens, init_ids, seed)
    elif tuple(init.shape) != (n_tokens, model.config.dim):
        raise AdapterError(f"prompt of shape {tuple(init.shape)}; this model needs ({n_tokens}, {model.config.dim})")
    model.prefix = SoftPrompt(init.to(dtype=model.dtype, device=model.device), encoder, hidden)
    model.prefix.train(model.training)
    model.record_transform("prompt", n_tokens=n_tokens, encoder=encoder, **({"hidden": hidden} if encoder != "none" else {}))
    return model.prefix


def save_prompt(model: nn.Module, path: str | Path, base_model: str = "", init_text: str | None = None) -> Path:
    """Write the soft prompt in PEFT's format: the P x dim embeddings the model actually uses."""
    from safetensors.torch import save_file

    if model.prefix is None:
        raise AdapterError("the model has no soft prompt to save")
    soft, c = model.prefix, model.config  # the settings are read from the prompt module
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        prompt = model.prefix().detach().float().contiguous().cpu()
    save_file({"prompt_embeddings": prompt}, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": PEFT_TYPES[soft.encoder], "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "num_virtual_tokens": soft.n_tokens, "token_dim": c.dim, "num_transformer_submodules": 1,
        "num_attention_heads": c.n_heads, "num_layers": c.n_layers, "inference_mode": True,
    }
    if soft.encoder == "none":
        config.update(prompt_tuning_init="TEXT" if init_text else "SAMPLE_VOCAB", prompt_tuning_init_text=init_text)
    else:
        config.update(encoder_reparameterization_type=soft.encoder.upper(), encoder_hidden_size=soft.hidden)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_prompt(model: nn.Module, path: str | Path, cfg: dict | None = None) -> torch.Tensor:
    """The (P, dim) virtual-token embeddings of a PEFT-format soft prompt, checked against `model`."""
    path = Path(path)
    cfg, tensors = read_adapter(path, ("PROMPT_TUNING", "P_TUNING"), cfg)
    weights_file = path / "adapter_model.safetensors"
    if "prompt_embeddings" not in tensors:
        raise AdapterError(f"{weights_file}: no 'prompt_embeddings' tensor (has {sorted(tensors)[:3]})")
    prompt = tensors["prompt_embeddings"]
    if prompt.dim() != 2 or prompt.shape[1] != model.config.dim or cfg.get("num_transformer_submodules", 1) != 1:
        base = cfg.get("base_model_name_or_path") or "another base model"
        raise AdapterError(f"{weights_file}: prompt of shape {tuple(prompt.shape)} was made for {base}; this "
                           f"{model.config.arch} model has dim {model.config.dim}")
    return prompt


def load_prompt(model: nn.Module, path: str | Path, cfg: dict | None = None) -> int:
    """Apply a PEFT-format soft prompt (PROMPT_TUNING or P_TUNING, ours or PEFT's). Returns P."""
    prompt = read_prompt(model, path, cfg)
    apply_prompt_tuning(model, prompt.shape[0], init=prompt)  # the encoder's output, learned directly from here
    return prompt.shape[0]
