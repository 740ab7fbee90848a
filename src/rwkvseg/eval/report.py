"""A self-contained HTML report (tables, training curves as inline SVG, image galleries), a training run folder as
reports and model cards read it, a run's training curves as a PNG, and the cross-validated curve of fold runs
(fold_curve: their mean at fixed epochs)."""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_write

CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """metrics.csv of a run -> one dict per epoch (empty cells dropped)."""
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


@dataclass(frozen=True)
class RunHistory:
    """A training run folder as the campaign table and the model cards read it: rows of metrics.csv (one per
    epoch; epochs without validation, val_every > 1, have no val_* keys), config.json, and summary.json's status
    and schedule_fit (the fit of the run to its time budget, fit_schedule) where the run wrote them."""

    name: str
    rows: list[dict[str, float]]
    config: dict[str, Any]
    status: str | None = None
    fit: dict[str, Any] | None = None

    @property
    def validated(self) -> list[dict[str, float]]:
        return [r for r in self.rows if "val_dice" in r]

    @property
    def best(self) -> dict[str, float] | None:
        """The row of the first epoch with the highest validation Dice, as the training loop keeps it."""
        return max(self.validated, key=lambda r: r["val_dice"]) if self.validated else None

    @property
    def ran(self) -> int:
        return len(self.rows)

    @property
    def minutes(self) -> float:
        """Training and validation time over every epoch."""
        return sum(r["train_seconds"] + r.get("val_seconds", 0.0) for r in self.rows) / 60

    def epochs_text(self) -> str:
        """Run against planned epochs in a few words: "15 of 40", or for a run fitted to its time limit
        "28 of 28 fitted (34 planned)"."""
        planned = self.config.get("epochs")
        if self.fit is None:
            return f"{self.ran} of {planned}"
        return f"{self.ran} of {self.fit['epochs']} fitted ({planned} planned)"

    def schedule(self) -> str:
        """Planned against run epochs, the fit to the run's time limit or why it stopped early, and how often it
        validated: a card's words."""
        planned, schedule = self.config["epochs"], self.config.get("optim", {}).get("schedule", "poly")
        head, target = f"planned {planned} epochs", planned
        if self.fit is not None:
            head += f", fitted to {self.fit['epochs']} after epoch {self.fit['epoch']} by the run's time limit"
            target = self.fit["epochs"]
        if self.ran == target:
            done = f" ({schedule} schedule compressed onto them), all run" if self.fit is not None else ", all run"
            text = head + done
        elif self.status in (None, "complete"):  # complete short of its epochs: stopped by its max_minutes
            text = f"{head}; stopped by the run's time limit after epoch {self.ran} ({schedule} schedule not finished)"
        else:
            text = f"{head}; {self.status} after epoch {self.ran}"
        if self.config.get("train_all"):
            text += ", no validation (train_all)"
        elif self.config.get("val_every", 1) > 1:
            text += f", validated every {self.config['val_every']} epochs and after the last"
        return text


def read_run(run: Path) -> RunHistory:
    """The RunHistory of a run folder (`rwkvseg train --out RUN`); FileNotFoundError naming what is missing."""
    missing = [str(run / f) for f in ("metrics.csv", "config.json") if not (run / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{' and '.join(missing)} not found: give the folder of a training run")
    summary = run / "summary.json"
    written = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    rows = read_metrics_csv(run / "metrics.csv")
    return RunHistory(run.name, rows, config, written.get("status"), written.get("schedule_fit"))


def write_run_curves(run: RunHistory, path: Path, name: str | None = None) -> list[str]:
    """The run's training loss and validation Dice (the mean, and each region's in 3D) per epoch as a PNG, the
    best epoch dotted, titled with name (default: the run's); returns the curves drawn (plot_curves)."""
    regions = [k for k in dict.fromkeys(k for r in run.validated for k in r) if k.startswith("val_dice_")]
    curves = {"val_dice": "validation Dice" + (" (mean)" if regions else "")}
    curves |= {k: f"validation Dice {k.removeprefix('val_dice_')}" for k in regions}
    best = run.best
    title = f"{name or run.name}: {run.epochs_text()} epochs"
    if best is not None:
        title += f", best Dice {best['val_dice']:.4f} at epoch {int(best['epoch'])}"
    loss = f"training loss ({run.config.get('loss', {}).get('name', '?')})"
    return plot_curves(run.rows, path, title, curves, loss, None if best is None else int(best["epoch"]))


Fold = Hashable  # a fold's key: its number, or a name such as its metrics.csv


def validated_by_epoch(rows: Sequence[Mapping[str, float]], metric: str) -> dict[int, Mapping[str, float]]:
    """Epoch -> row of the epochs whose row has metric (validated; val_every > 1 leaves the others without), in
    epoch order."""
    return dict(sorted(((int(r["epoch"]), r) for r in rows if metric in r), key=lambda pair: pair[0]))


def common_means(folds: Mapping[Fold, Sequence[Mapping[str, float]]], metric: str = "val_dice") -> dict[int, float]:
    """Epoch -> the mean of metric over the folds, at each epoch every fold validated (ascending; empty when
    none): the cross-validated curve of a recipe."""
    by_fold = [validated_by_epoch(rows, metric) for rows in folds.values()]
    epochs = sorted(set.intersection(*(set(v) for v in by_fold))) if by_fold else []
    return {e: sum(v[e][metric] for v in by_fold) / len(by_fold) for e in epochs}


@dataclass(frozen=True)
class FoldCurve:
    """The validation curve of a cross-validation's fold runs read at fixed epochs (fold_curve).

    Three readings of it, each with the means of its regions (region -> mean; empty without region columns):
    - per_fold_best: the mean of each fold's own best (its first epoch with the highest metric, as the training
      loop keeps it). Optimistic: each fold's epoch is chosen on the validation cases it then scores.
    - best: the mean at best_epoch, the one epoch of the curve with the highest mean (ties: the earliest), chosen
      for every fold at once; still chosen on the cases scored, but one choice instead of one per fold.
    - last: the mean at each fold's last validated epoch (last_epochs): what a model trained on every case
      (train_all) keeps, with no choice made on the cases scored.
    """

    metric: str
    folds: tuple[Fold, ...]
    epochs: tuple[int, ...]  # validated by every fold, ascending
    mean: tuple[float, ...]  # the mean over the folds at each of epochs
    per_fold_best_epochs: dict[Fold, int]
    per_fold_best: float
    best_epoch: int
    best: float
    last_epochs: dict[Fold, int]
    last: float
    regions: tuple[str, ...] = ()  # e.g. ("WT", "TC", "ET"): the columns <metric>_<region> of every validated row
    per_fold_best_regions: dict[str, float] = field(default_factory=dict)
    best_regions: dict[str, float] = field(default_factory=dict)
    last_regions: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The curve as a JSON object: folds by name (str), the curve as epoch -> mean, each reading's epochs, mean
        and region means."""
        return {
            "metric": self.metric,
            "folds": [str(k) for k in self.folds],
            "curve": {str(e): m for e, m in zip(self.epochs, self.mean, strict=True)},
            "per_fold_best": {  # optimistic: each fold's epoch chosen on the cases it scores
                "epochs": {str(k): e for k, e in self.per_fold_best_epochs.items()},
                "mean": self.per_fold_best,
                "regions": self.per_fold_best_regions,
            },
            "best_common_epoch": {"epoch": self.best_epoch, "mean": self.best, "regions": self.best_regions},
            "last": {
                "epochs": {str(k): e for k, e in self.last_epochs.items()},
                "mean": self.last,
                "regions": self.last_regions,
            },
        }


def fold_curve(folds: Mapping[Fold, Sequence[Mapping[str, float]]], metric: str = "val_dice") -> FoldCurve:
    """The FoldCurve of fold runs' histories (fold -> metrics.csv rows as read_metrics_csv returns them) on one
    metric column (val_dice, or a region's: val_dice_WT, ...). ValueError when a fold never validated metric, or no
    epoch was validated by every fold."""
    if not folds:
        raise ValueError("no fold histories given; give the metrics.csv rows of each fold run")
    by_fold = {k: validated_by_epoch(rows, metric) for k, rows in folds.items()}
    for k, validated in by_fold.items():
        if not validated:
            seen = sorted({c for r in folds[k] for c in r if c.startswith("val_") and c != "val_seconds"})
            choose = f"choose one of {', '.join(seen)}" if seen else "give runs that validated (not train_all)"
            raise ValueError(f"fold {k} has no epoch with {metric}; {choose}")
    curve = common_means(folds, metric)
    if not curve:
        spans = ", ".join(f"fold {k}: {min(v)}-{max(v)}" for k, v in by_fold.items())
        raise ValueError(f"no epoch is validated by every fold ({spans}); give fold runs of one schedule")
    validated = [r for v in by_fold.values() for r in v.values()]
    suffixes = dict.fromkeys(c.removeprefix(f"{metric}_") for c in validated[0] if c.startswith(f"{metric}_"))
    regions = tuple(x for x in suffixes if all(f"{metric}_{x}" in r for r in validated))

    def means(picked: Mapping[Fold, int]) -> tuple[float, dict[str, float]]:
        rows = [by_fold[k][e] for k, e in picked.items()]
        return (
            sum(r[metric] for r in rows) / len(rows),
            {x: sum(r[f"{metric}_{x}"] for r in rows) / len(rows) for x in regions},
        )

    own = {k: max(v, key=lambda e, v=v: v[e][metric]) for k, v in by_fold.items()}  # max keeps the first of ties
    best_epoch = max(curve, key=curve.__getitem__)  # ascending epochs: the earliest of ties
    last = {k: max(v) for k, v in by_fold.items()}
    per_fold_best, per_fold_best_regions = means(own)
    best, best_regions = means(dict.fromkeys(by_fold, best_epoch))
    last_mean, last_regions = means(last)
    return FoldCurve(
        metric,
        tuple(folds),
        tuple(curve),
        tuple(curve.values()),
        own,
        per_fold_best,
        best_epoch,
        best,
        last,
        last_mean,
        regions,
        per_fold_best_regions,
        best_regions,
        last_regions,
    )


def plot_fold_curves(folds: Mapping[int, RunHistory], path: Path, title: str) -> list[str]:
    """The runs of a cross-validation in one PNG (plot_curves): their mean validation Dice (black, at the epochs
    every fold validated: common_means), each fold's, and the training loss averaged over the folds that ran each
    epoch; returns the curves drawn."""
    ordered = sorted(folds.items())
    by_epoch = {k: {int(r["epoch"]): r for r in run.rows} for k, run in ordered}  # fold -> epoch -> its row
    mean = common_means({k: run.rows for k, run in ordered})
    history = []
    for epoch in sorted({e for rows in by_epoch.values() for e in rows}):
        rows = {k: fold_rows[epoch] for k, fold_rows in by_epoch.items() if epoch in fold_rows}
        entry: dict[str, float] = {
            "epoch": epoch,
            "train_loss": sum(r["train_loss"] for r in rows.values()) / len(rows),
        }
        if epoch in mean:
            entry["mean"] = mean[epoch]
        history.append(entry | {f"fold{k}": r["val_dice"] for k, r in rows.items() if "val_dice" in r})
    curves = {"mean": f"validation Dice, mean over the {len(ordered)} folds"}
    curves |= {f"fold{k}": f"fold {k}" for k, _ in ordered}
    losses = sorted({run.config.get("loss", {}).get("name", "?") for _, run in ordered})
    return plot_curves(history, path, title, curves, f"training loss ({', '.join(losses)}), mean over the folds")


def svg_curves(
    history: Sequence[dict[str, float]], keys: Sequence[str], title: str, width: int = 460, height: int = 240
) -> str:
    """Line plot of history[epoch][key] against epoch for each key present; missing points are skipped."""
    series = {k: [(r["epoch"], r[k]) for r in history if k in r and math.isfinite(r[k])] for k in keys}
    series = {k: pts for k, pts in series.items() if pts}
    if not series:
        return f"<p>{html.escape(title)}: no data</p>"
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0
    left, right, top, bottom = 44, 12, 22, 28

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
        f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{py(y0)}" x2="{width - right}" y2="{py(y0)}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        parts.append(f'<text x="4" y="{py(y) + 4:.1f}">{y:.3g}</text>')
    parts.append(f'<text x="{left}" y="{height - 8}">epoch {x0:g}</text>')
    parts.append(f'<text x="{width - right - 50}" y="{height - 8}">epoch {x1:g}</text>')
    for i, (key, pts) in enumerate(series.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        if len(pts) == 1:
            parts.append(f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{colour}"/>')
        parts.append(f'<text x="{left + 8 + 110 * i}" y="{top + 12}" fill="{colour}">{html.escape(key)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def plot_curves(
    history: Sequence[dict[str, float]],
    path: Path,
    title: str,
    curves: Mapping[str, str],
    loss_label: str = "training loss",
    mark_epoch: int | None = None,
) -> list[str]:
    """A PNG of a run's validation curves (0 to 1, left axis) and training loss (its own scale, right axis)
    against epoch (matplotlib, Agg); returns the legend labels drawn.

    history: metrics.csv rows (read_metrics_csv); curves: column -> legend label, drawn where a row has the column
    (epochs without validation are skipped; a column no row has is left out); the first (the one that selects the
    checkpoint) is drawn black and thicker; mark_epoch: a dotted line there (e.g. the best epoch). Needs
    matplotlib (`pip install 'rwkvseg[plots]'`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the curves figure needs matplotlib: pip install 'rwkvseg[plots]'") from None
    lines = {label: [(r["epoch"], r[k]) for r in history if k in r] for k, label in curves.items()}
    lines = {label: pts for label, pts in lines.items() if pts}
    loss = [(r["epoch"], r["train_loss"]) for r in history if "train_loss" in r]
    if not lines and not loss:
        raise ValueError(f"no training loss or {', '.join(curves)} in the history to plot for {path}")
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    handles = []
    for i, (label, pts) in enumerate(lines.items()):
        style = {"color": "black", "linewidth": 2, "zorder": 3} if i == 0 else {"linewidth": 1.2}
        marker = "o" if len(pts) <= 60 else None  # sparse validations (val_every > 1) show where they were
        handles += ax.plot(*zip(*pts, strict=True), marker=marker, markersize=3, label=label, **style)
    if loss:
        right = ax.twinx()
        handles += right.plot(*zip(*loss, strict=True), color="grey", linewidth=1, label=loss_label)
        top = max((y for _, y in loss if math.isfinite(y)), default=1.0)
        right.set_ylim(0, 1.05 * top if top > 0 else 1.0)
        right.set_ylabel(loss_label, fontsize=8)
    if mark_epoch is not None:
        ax.axvline(mark_epoch, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return [h.get_label() for h in handles]


def html_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, '-'))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def gallery(images: Sequence[Path], base: Path, caption: str) -> str:
    tiles = "".join(
        f'<figure><img src="{html.escape(p.relative_to(base).as_posix())}" width="200"><figcaption>'
        f"{html.escape(p.stem)}</figcaption></figure>"
        for p in images
    )
    return f"<p>{html.escape(caption)}</p><div class='gallery'>{tiles}</div>"


def write_report(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """sections: (heading, HTML body). Image paths in bodies are relative to path's folder."""
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}.gallery{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}"
        "figcaption{font-size:11px;text-align:center}"
    )
    body = "".join(f"<h2>{html.escape(h)}</h2>{b}" for h, b in sections)
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>",
        encoding="utf-8",
    )
    return path
