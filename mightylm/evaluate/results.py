"""Where an evaluation's results live, so an interrupted run keeps what it finished and resumes.

    OUT/<task>/settings.json   the model, task settings and seed the results were made with
    OUT/<task>/samples.jsonl   one line per finished item (its prediction and scores), appended as they finish
    OUT/<task>/summary.json    the task's metrics
    OUT/<task>/*.png           the task's plots
    OUT/results.json           every task's summary with its settings
    OUT/report.html            one page with the summaries and the plots embedded

Running again with the same settings skips the items already in samples.jsonl; different settings
are refused (they would mix), unless `overwrite` starts the task afresh.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path
from typing import Callable

from mightylm.evaluate.backend import EvalError


def holds_results(root: Path) -> bool:
    """Whether `root` is an evaluation results directory (one this verb may add to and resume in)."""
    return (root / "results.json").exists() or any((d / "settings.json").exists() for d in root.iterdir() if d.is_dir())


class ResultStore:
    def __init__(self, out: str | Path, task: str, settings: dict, *, overwrite: bool = False):
        self.root, self.dir = Path(out), Path(out) / task
        self.task, self.settings = task, settings
        if overwrite and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        recorded = self.dir / "settings.json"
        if recorded.exists():
            before = json.loads(recorded.read_text())
            if before != json.loads(json.dumps(settings)):
                changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
                raise EvalError(f"{self.dir}: holds results made with other settings (differing: {', '.join(changed)}); "
                                "use another --out, or --overwrite true to start this task again")
        else:
            recorded.write_text(json.dumps(settings, indent=2) + "\n")
        self.done = self._read()

    def _read(self) -> dict:
        path, done = self.dir / "samples.jsonl", {}
        if not path.exists():
            return done
        good = 0
        with path.open("rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    break  # a line cut short by a crash: drop it and everything after
                done[record["id"]] = record
                good += len(line)
        with path.open("r+b") as f:
            f.truncate(good)
        return done

    def run(self, items: list[dict], score: Callable[[list[dict]], list[dict]], *, batch_size: int,
            progress: bool = True) -> list[dict]:
        """Score the items not finished yet, `batch_size` at a time, appending each batch's records as it
        finishes; returns every item's record in the items' order."""
        from tqdm import tqdm

        pending = [item for item in items if item["id"] not in self.done]
        with (self.dir / "samples.jsonl").open("a") as f, \
                tqdm(total=len(items), initial=len(items) - len(pending), desc=self.task, unit="item",
                     disable=not progress, dynamic_ncols=True) as bar:
            for i in range(0, len(pending), batch_size):
                chunk = pending[i:i + batch_size]
                records = score(chunk)
                for item, record in zip(chunk, records):
                    record = {"id": item["id"], **record}
                    self.done[item["id"]] = record
                    f.write(json.dumps(record) + "\n")
                f.flush()
                bar.update(len(chunk))
        return [self.done[item["id"]] for item in items]

    def finish(self, summary: dict) -> dict:
        """Write the task's summary and refresh results.json and report.html."""
        summary = {"task": self.task, "settings": self.settings, **summary}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_report(self.root)
        return summary


def write_report(out: str | Path) -> Path:
    out = Path(out)
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
    (out / "results.json").write_text(json.dumps({s["task"]: s for s in summaries}, indent=2) + "\n")
    parts = ["<!doctype html><meta charset='utf-8'><title>mightylm evaluation</title>",
             "<style>body{font:15px system-ui,sans-serif;max-width:960px;margin:2em auto}td,th{padding:2px 10px;"
             "text-align:left}table{border-collapse:collapse}tr:nth-child(odd){background:#f4f4f4}"
             "img{max-width:100%}</style><h1>mightylm evaluation</h1>"]
    for s in summaries:
        parts.append(f"<h2>{html.escape(s['task'])}</h2><table>")
        for key, value in s.items():
            if key not in ("task", "plots") and not isinstance(value, (dict, list)):
                parts.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(_fmt(value))}</td></tr>")
        for key in ("settings", "metrics"):
            for k, v in (s.get(key) or {}).items():
                parts.append(f"<tr><th>{key}.{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>")
        parts.append("</table>")
        for name in s.get("plots", []):
            data = base64.b64encode((out / s["task"] / name).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'></p>")
    page = out / "report.html"
    page.write_text("\n".join(parts) + "\n")
    return page


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)
