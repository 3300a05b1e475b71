"""Run reports: a PNG of training and validation loss against tokens seen, and a short summary
(report.md) of tokens, time, throughput, peak memory, final losses and sample generations.

Written at the end of every training run, and on demand with `mighty report RUN_DIR`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mightylm.errors import MightyError

UTIL_PREFIX = "moe_util.L"  # = moe.UTIL_PREFIX (not imported: this module stays free of torch)


class ReportError(MightyError, FileNotFoundError):
    """A run directory without readable metrics."""


def read_metrics_lines(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line cut short (what a kill mid-write leaves) is dropped; a broken
    line before the last is an error naming the file and the line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a metrics record")
        except ValueError as e:
            if number == len(lines):
                break  # torn last line
            raise ReportError(f"{path}:{number}: not a metrics record ({e}); the file is damaged before its last "
                              "line") from None
        rows.append(record)
    return rows


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ReportError(f"{path}: not found; is {run_dir} a training run directory?")
    rows = read_metrics_lines(path)
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def plot_losses(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    out = Path(out or run_dir / "report.png")
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    if train:
        x = [r["tokens"] / 1e6 for r in train]
        y = [r["loss"] for r in train]
        ax.plot(x, y, color="tab:blue", alpha=0.35, linewidth=0.8, label="train loss (logged steps)")
        ax.plot(x, _centred_mean(y, max(1, len(y) // 15)), color="tab:blue", linewidth=1.8,
                label="train loss (moving average)")
    if val:
        ax.plot([r["tokens"] / 1e6 for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange",
                linewidth=1.8, markersize=4, label="validation loss")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.set_title(f"Training run: {run_dir.resolve().name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_experts(run_dir: str | Path, train: list[dict]) -> Path | None:
    """experts.png: each MoE layer's expert utilisation (1.0 fair, 0.0 dead) over training, one row per (layer,
    expert), one column per logged step; None for a run without experts."""
    keys = sorted({k for r in train for k in r if k.startswith(UTIL_PREFIX)},
                  key=lambda k: tuple(int(part[1:]) for part in k.removeprefix("moe_util.").split(".")))
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in train if keys[0] in r]
    grid = [[r.get(k, float("nan")) for r in rows] for k in keys]
    layers = sorted({k.split(".")[1] for k in keys}, key=lambda name: int(name[1:]))
    experts = len(keys) // len(layers)
    fig, ax = plt.subplots(figsize=(8, min(12, 1.5 + 0.12 * len(keys))), dpi=120)
    image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=2, interpolation="nearest",
                      extent=(rows[0]["step"], rows[-1]["step"], len(keys), 0))
    for i in range(1, len(layers)):
        ax.axhline(i * experts, color="white", linewidth=0.6)
    ax.set_yticks([(i + 0.5) * experts for i in range(len(layers))], [f"layer {name[1:]}" for name in layers])
    ax.set_xlabel("step")
    ax.set_title(f"Expert utilisation ({experts} experts per layer; 1.0 fair, 0.0 dead)")
    fig.colorbar(image, ax=ax, label="load / fair load")
    fig.tight_layout()
    out = Path(run_dir) / "experts.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def _centred_mean(values: list[float], half: int) -> list[float]:
    """Mean over a window of +-half points around each one (narrower at the ends): no lag."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def write_report(run_dir: str | Path, samples: dict[str, str] | None = None) -> Path:
    """report.png + report.md for a run directory; returns the path of report.md."""
    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if samples:
        summary["samples"] = samples
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    png = plot_losses(run_dir)
    experts = plot_experts(run_dir, train)
    seconds = summary.get("seconds") or (train[-1]["time"] if train else 0)
    tokens = train[-1]["tokens"] if train else 0
    lines = [f"# Run report: {run_dir.resolve().name}", "", f"![loss curves]({png.name})", "",
             *([f"![expert utilisation]({experts.name})", ""] if experts else []),
             "| | |", "|---|---|",
             f"| steps | {train[-1]['step'] if train else 0} |",
             f"| tokens seen | {tokens:,} |",
             f"| time | {seconds / 60:.1f} min |",
             f"| throughput | {tokens / max(seconds, 1e-9):,.0f} tokens/s |"]
    if "peak_memory_mb" in summary:
        lines.append(f"| peak memory | {summary['peak_memory_mb']:,.0f} MB |")
    if train:
        lines.append(f"| final train loss | {train[-1]['loss']:.4f} |")
        standard = {"step", "tokens", "loss", "lr", "tokens_per_s", "grad_norm", "time"}
        for key, value in train[-1].items():  # the loss's named parts (loss_fn's metrics)
            if key not in standard and not key.startswith(UTIL_PREFIX) and isinstance(value, (int, float)):
                lines.append(f"| final {key} | {value:.4g} |")
    if val:
        lines.append(f"| final validation loss | {val[-1]['val_loss']:.4f} (perplexity {math.exp(val[-1]['val_loss']):.1f}) |")
    for prompt, text in (summary.get("samples") or {}).items():
        lines += ["", f"**Sample** (prompt {prompt!r}):", "", "```", prompt + text, "```"]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
