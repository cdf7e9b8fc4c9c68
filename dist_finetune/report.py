"""Rank 0's run report: metrics.jsonl, history.csv, plots, trackers, progress, summary.json.

Nothing here holds a collective: callers hand in numbers already reduced across ranks.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import files, logs, trackers
from .runs import RunError

HISTORY_FIELDS = (
    "step", "epoch", "examples_seen", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
)
PLOTS = ("loss.png", "accuracy.png", "confusion_test.png", "scatter_test.png")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is KiB on Linux: the peak resident set of this process.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux /proc): start-up before main() counts too."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


def write_json(path: Path, data: Any) -> None:
    files.atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _last_line_torn(path: Path, number: int, lines: list[str], problem: str) -> bool:
    """A bad line is forgiven only as the file's last: what a crash or a full disk mid-append leaves."""
    if any(text.strip() for text in lines[number:]):
        raise RunError(f"{path}: line {number} is damaged ({problem}) and is not the last line; delete that line "
                       "(or the run folder) and run again")
    return True


def read_jsonl(path: Path) -> tuple[list[tuple[dict[str, Any], str]], str | None]:
    """The (record, line) pairs of a JSON-lines file, and its last line when that one is cut short."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept: list[tuple[dict[str, Any], str]] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            problem = "" if isinstance(record, dict) else "not a JSON object"
        except ValueError as exc:
            problem = f"not JSON: {exc}"
        if problem and _last_line_torn(path, number, lines, problem):
            return kept, text
        kept.append((record, text))
    return kept, None


@dataclass
class Reporter:
    """Writes the run folder's reports. Construct it on rank 0 only (`enabled=False` elsewhere)."""

    run_dir: Path
    enabled: bool
    progress: str = "auto"
    total_steps: int = 0
    trackers: tuple[str, ...] = ()
    tracking: trackers.RunInfo | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    _bar: Any = None
    _use_bar: bool = False
    _open: list[Any] = field(default_factory=list)
    _last_line: float = 0.0

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._use_bar = self.progress == "on" or (self.progress == "auto" and sys.stderr.isatty())
        self._load_history()
        if self.trackers and self.tracking is not None:
            self._open = trackers.open_trackers(self.trackers, self.tracking)
            for message in self.tracking.warnings:
                self.warn(message)

    def _load_history(self) -> None:
        """A resumed run keeps the history it had (events after the checkpoint are replayed anew). A last
        line cut short by a crash or a full disk is dropped with a warning, so appends start on a new line."""
        path = self.run_dir / "history.csv"
        if path.exists():
            with path.open(newline="", encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
            self.history = []
            for number, row in enumerate(csv.DictReader(lines), 2):
                if None in row or None in row.values():  # too many or too few cells
                    _last_line_torn(path, number, lines, f"{len(row)} cells for {len(HISTORY_FIELDS)} columns")
                    self.warn(f"{path}: dropped its last line, cut short by an earlier crash or a full disk")
                    break
                self.history.append({k: _num(v) for k, v in row.items()})
        self._keep_metrics(lambda record: True)

    def _keep_metrics(self, keep) -> None:
        """Rewrites metrics.jsonl with the records `keep` accepts (only when that drops something)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        records, torn = read_jsonl(path)
        if torn is not None:
            shown = torn if len(torn) <= 40 else torn[:37] + "..."
            self.warn(f"{path}: dropped its last line ({shown!r}), cut short by an earlier crash or a full disk")
        kept = [text for record, text in records if keep(record)]
        if torn is not None or len(kept) < len(records):
            files.atomic_write_text(path, "".join(text + "\n" for text in kept))

    def truncate_after(self, step: int) -> None:
        if not self.enabled:
            return
        self.history = [row for row in self.history if row["step"] <= step]
        self._write_history()
        self._keep_metrics(lambda record: record.get("step", 0) <= step)

    def event(self, kind: str, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"event": kind, "time": round(time.time(), 3), **values}
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._open and kind != "summary" and isinstance(values.get("step"), int):
            scalars = {trackers.metric_name(kind, k): v for k, v in trackers.numbers(values).items()}
            self._each_tracker(lambda t: t.metrics(scalars, values["step"]))

    def _each_tracker(self, call) -> None:
        """A tracker that fails is warned about once and dropped; training goes on."""
        for tracker in list(self._open):
            try:
                call(tracker)
            except Exception as exc:
                self._open.remove(tracker)
                self.warn(f"report.trackers: {tracker.name} failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no message'}); no more logging to it in "
                          "this run")
                with contextlib.suppress(Exception):  # its run ends as failed, not running for ever
                    tracker.close("failed")

    def end_trackers(self, status: str) -> None:
        """finished, failed or stopped (a signal; resume continues the same tracker runs)."""
        self._each_tracker(lambda t: t.close(status))
        self._open = []

    def open_progress(self, step: int) -> None:
        """The progress bar (when one is wanted) from `step` on: 0, or where a resumed run starts."""
        if not self.enabled or not self._use_bar or self._bar is not None:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=self.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def advance(self, step: int) -> None:
        """Every optimizer step: moves the bar to `step`; reads nothing from the device (no host sync)."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def step(self, step: int, message: str) -> None:
        """A log step: the numbers (already on the host) beside the bar, or as a line without one."""
        if not self.enabled:
            return
        if self._bar is not None:
            self.advance(step)
            self._bar.set_postfix_str(message, refresh=True)
        else:
            print(f"step {step}/{self.total_steps} {message}", flush=True)
        logs.echo(f"step {step}/{self.total_steps} {message}")

    def close_progress(self, note: str = "") -> None:
        """The bar stays where the run ended: 100% when every step ran, else the stop point and `note`."""
        if self._bar is None:
            return
        if note:
            self._bar.set_postfix_str(note, refresh=False)
        self._bar.close()
        self._bar = None

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)
        logs.echo(message)

    def warn(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(f"warning: {message}", file=sys.stderr)
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        logs.echo(f"warning: {message}", logging.WARNING)

    def eval_point(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        task_metrics = {k: v for k, v in row.items() if k.startswith("val_") and k not in HISTORY_FIELDS}
        self.history.append({**{k: row.get(k) for k in HISTORY_FIELDS}, **task_metrics})  # multi_label, regression
        self._write_history()
        self.event("eval", **row)

    def _write_history(self) -> None:
        text = io.StringIO()
        extra = [k for k in (self.history[0] if self.history else {}) if k not in HISTORY_FIELDS]
        writer = csv.DictWriter(text, fieldnames=[*HISTORY_FIELDS, *extra])
        writer.writeheader()
        writer.writerows(self.history)
        files.atomic_write_text(self.run_dir / "history.csv", text.getvalue())

    def finish(self, summary: dict[str, Any], plots: bool = True, points: Any = None) -> None:
        """`points`: task=regression, the test split's (predicted, true) values, for scatter_test.png."""
        if not self.enabled:
            return
        self.close_progress()
        if plots and self.history:
            plot_history(self.history, self.run_dir)
        if plots and points is not None:
            plot_scatter(points, summary["labels"], self.run_dir / "scatter_test.png")
        test = summary.get("test") or {}
        if plots and "confusion_matrix" in test:
            plot_confusion(test["confusion_matrix"], summary["labels"], self.run_dir / "confusion_test.png",
                           title=f"test split ({test['examples']} examples)")
        write_json(self.run_dir / "summary.json", summary)
        images = [name for name in PLOTS if plots and (self.run_dir / name).is_file()]
        files.atomic_write_text(self.run_dir / "report.md", report_markdown(summary, self.run_dir, images))
        self.event("summary", **{k: v for k, v in summary.items() if not isinstance(v, dict)})
        if self._open:
            outputs = [self.run_dir / name for name in (*images, "report.md", "summary.json")]
            self._each_tracker(lambda t: t.metrics(trackers.flat_summary(summary), summary["global_step"]))
            self._each_tracker(lambda t: t.artifacts(outputs))
            self.end_trackers("finished")


def _num(text: str) -> Any:
    if text in ("", "None"):
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def plot_history(history: list[dict[str, Any]], run_dir: Path) -> None:
    """The chapter's plots: train/val curves against epochs, examples seen on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    seen = [row["examples_seen"] for row in history]
    for metric, filename in (("loss", "loss.png"), ("accuracy", "accuracy.png")):
        if all(row.get(f"val_{metric}") is None for row in history):  # task=regression: no accuracy
            continue
        fig, ax = plt.subplots(figsize=(5, 3))
        for split, style in (("train", "-"), ("val", "-.")):
            values = [_finite(row.get(f"{split}_{metric}")) for row in history]
            ax.plot(epochs, values, style, marker="o", markersize=3, label=f"{split} {metric}")
        ax.set_xlabel("epochs")
        ax.set_ylabel(metric)
        ax.legend()
        top = ax.twiny()
        top.plot(seen, [0.0] * len(seen), alpha=0)  # aligns the examples-seen axis
        top.set_xlabel("examples seen")
        fig.tight_layout()
        save_figure(fig, run_dir / filename)


def save_figure(fig: Any, path: Path) -> None:
    """A PNG that appears whole (written under a temporary name, then renamed); closes the figure."""
    import matplotlib.pyplot as plt

    try:
        with files.writing(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")  # no label cut off at an edge
    finally:
        plt.close(fig)


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float("nan")


def plot_confusion(confusion: list[list[int]], labels: list, path: Path, title: str = "") -> None:
    """Counts in each cell; rows are the true labels, columns the predicted ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    names = [str(label) for label in labels]
    size = max(3.0, 0.6 * len(names) + 2.0)
    fig, ax = plt.subplots(figsize=(size + 0.6, size * 0.85), layout="constrained")
    image = ax.imshow(confusion, cmap="Blues")
    peak = max((v for row in confusion for v in row), default=0)
    for i, row in enumerate(confusion):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    long = max(map(len, names), default=0) > 6
    ax.set_xticks(range(len(names)), names, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    if title:
        ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.locator = MaxNLocator(integer=True)  # whole counts: no 0.5 ticks
    bar.update_ticks()
    save_figure(fig, path)


def plot_scatter(points: Any, targets: list, path: Path) -> None:
    """task=regression: predicted against true value of each test text, one panel per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted, true = (p.numpy() for p in points)
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 4), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes[0], targets)):
        ax.scatter(true[:, k], predicted[:, k], s=8, alpha=0.6)
        low, high = float(min(true[:, k].min(), predicted[:, k].min())), float(max(true[:, k].max(),
                                                                                    predicted[:, k].max()))
        ax.plot([low, high], [low, high], "k--", linewidth=1)  # where predicted = true
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
    fig.tight_layout()
    save_figure(fig, path)


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _scores(name: str, s: dict[str, Any]) -> str:
    return _row([name, f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}", s["support"]])


def report_markdown(summary: dict[str, Any], run_dir: Path, images: list[str]) -> str:
    """The run at a glance: the task's tables (per class, or per label, on the test split), the plots."""
    splits = [s for s in ("train", "val", "test") if isinstance(summary.get(s), dict)]
    lines = [f"# Run report: {run_dir.name}", "",
             f"Best checkpoint `{summary.get('best_checkpoint')}` (step {summary.get('best_step')} of "
             f"{summary.get('global_step')}, {summary.get('epochs_completed')} epochs, stopped early: "
             f"{'yes' if summary.get('stopped_early') else 'no'}); {summary.get('world_size')} rank(s), "
             f"ZeRO stage {summary.get('zero_stage')}, {summary.get('precision')}, {summary.get('wall_seconds')} s.",
             ""]
    if summary.get("class_weights"):
        weights = ", ".join(f"{label} {w:.4g}" for label, w in zip(summary["labels"], summary["class_weights"]))
        lines += [f"Training loss weighted by class: {weights}.", ""]
    first = summary.get(splits[0]) or {}
    tables = _multi_label_tables if "per_label" in first else _regression_tables if "rmse" in first else (
        _classification_tables)
    lines += tables(summary, splits)
    if images:
        lines += ["", "## Plots", ""] + [f"![{name[:-4].replace('_', ' ')}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def _multi_label_tables(summary: dict[str, Any], splits: list[str]) -> list[str]:
    lines = [_row(["split", "examples", "loss", "micro F1", "macro F1", "subset accuracy", "Hamming loss"]),
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [_row([split, summary[split]["examples"], *(f"{summary[split][k]:.4f}" for k in (
        "loss", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"))]) for split in splits]
    last = summary[splits[-1]]
    lines += ["", f"## {splits[-1].capitalize()} split, per label", "",
              _row(["label", "precision", "recall", "F1", "support", "threshold"]), "|---|---:|---:|---:|---:|---:|"]
    return lines + [_row([p["label"], f"{p['precision']:.4f}", f"{p['recall']:.4f}", f"{p['f1']:.4f}", p["support"],
                          f"{p['threshold']:.2f}"]) for p in last["per_label"]]


def _regression_tables(summary: dict[str, Any], splits: list[str]) -> list[str]:
    lines = [_row(["split", "examples", "loss", "RMSE", "MAE", "R²", "Pearson", "Spearman"]),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    return lines + [_row([split, summary[split]["examples"], *(f"{summary[split][k]:.4f}" for k in (
        "loss", "rmse", "mae", "r2", "pearson", "spearman"))]) for split in splits]


def _classification_tables(summary: dict[str, Any], splits: list[str]) -> list[str]:
    lines = [_row(["split", "examples", "loss", "accuracy", "macro F1"]), "|---|---:|---:|---:|---:|"]
    for split in splits:
        r = summary[split]
        macro_f1 = f"{r['macro']['f1']:.4f}" if "macro" in r else "-"
        lines.append(_row([split, r["examples"], f"{r['loss']:.4f}", f"{r['accuracy']:.4f}", macro_f1]))
    test = summary.get("test") or {}
    if "per_class" in test:
        lines += ["", "## Test split, per class", "",
                  _row(["label", "precision", "recall", "F1", "support"]), "|---|---:|---:|---:|---:|"]
        lines += [_scores(str(c["label"]), c) for c in test["per_class"]]
        lines += [_scores("macro avg", test["macro"]), _scores("weighted avg", test["weighted"])]
        names = [str(label) for label in summary["labels"]]
        lines += ["", "Confusion matrix (rows: true label, columns: predicted label):", "",
                  _row(["true \\ predicted", *names]), "|---|" + "---:|" * len(names)]
        lines += [_row([name, *row]) for name, row in zip(names, test["confusion_matrix"])]
    return lines
