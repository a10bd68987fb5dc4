"""Results of a guidance sweep on disk: results.csv/json, plots/*.png, sample grids and report.md.

Rows are flat dicts, one per guidance setting, e.g. {"cfg_scale": 3.0, "fid": 12.1, "is_mean": 8.2,
"is_std": 0.1, "precision": 0.7, "recall": 0.5, "kid_mean": ..., "kid_std": ..., "class_accuracy": 0.9}.
Missing metrics are simply not plotted. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.io import atomic_write_bytes, atomic_write_text, json_safe

METRIC_NAMES = {
    "fid": "FID",
    "sfid": "sFID",
    "is_mean": "Inception Score",
    "precision": "precision",
    "recall": "recall",
    "kid_mean": "KID",
    "class_accuracy": "class accuracy",
}


AXIS_LABELS = {"nfe": "U-Net evaluations per sample (CFG: 2 per step)"}


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def write_results(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `out_dir`/results.csv and results.json; returns (csv_path, json_path).

    Columns are the union of the rows' keys in first-seen order; a missing or non-finite value is an
    empty CSV cell and a JSON null; nested values are JSON-encoded in the CSV.
    """
    out_dir = Path(out_dir)
    plain_rows = [json_safe(dict(row)) for row in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(plain_rows), restval="", lineterminator="\n")
    writer.writeheader()
    for row in plain_rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()})
    csv_path = atomic_write_text(out_dir / "results.csv", buf.getvalue())
    json_path = atomic_write_text(
        out_dir / "results.json", json.dumps(plain_rows, indent=2, allow_nan=False) + "\n"
    )
    return csv_path, json_path


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def best_row(rows: Sequence[Mapping[str, Any]], key: str = "fid") -> Mapping[str, Any] | None:
    """The row with the lowest finite `key`, or None when no row has one."""
    scored = [row for row in rows if _number(row.get(key)) is not None]
    return min(scored, key=lambda row: _number(row[key])) if scored else None


def _series(
    rows: Sequence[Mapping[str, Any]], x_key: str, y_key: str, group_key: str | None
) -> dict[str, list[tuple[float, float, Mapping[str, Any]]]]:
    """{group: [(x, y, row), ...] sorted by x}, rows lacking a finite x or y left out."""
    groups: dict[str, list[tuple[float, float, Mapping[str, Any]]]] = {}
    for row in rows:
        x, y = _number(row.get(x_key)), _number(row.get(y_key))
        if x is not None and y is not None:
            group = str(row.get(group_key, "")) if group_key else ""
            groups.setdefault(group, []).append((x, y, row))
    return {group: sorted(points, key=lambda p: p[0]) for group, points in groups.items()}


def _save_figure(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _new_axes(title: str, x_label: str, y_label: str):
    # A bare Figure on an Agg canvas (no pyplot): no global state, no display, safe in worker processes.
    fig = Figure(figsize=(5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.grid(alpha=0.3)
    return fig, ax


def _plot_metric_lines(ax, rows, x_key: str, y_keys: Sequence[str], group_key: str | None) -> bool:
    """One line per (group, metric); error bars from `<metric>_std` for `<metric>_mean` keys."""
    drew = False
    for y_key in y_keys:
        std_key = y_key.removesuffix("_mean") + "_std" if y_key.endswith("_mean") else None
        for group, points in _series(rows, x_key, y_key, group_key).items():
            xs, ys, point_rows = zip(*points)
            errs = [_number(r.get(std_key)) or 0.0 for r in point_rows] if std_key else None
            label = " ".join(part for part in (METRIC_NAMES.get(y_key, y_key), group) if part)
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
            drew = True
    if drew and (len(y_keys) > 1 or group_key):
        ax.legend()
    return drew


def _plot_tradeoff(ax, rows, x_key: str, group_key: str | None) -> bool:
    """FID against Inception Score, each point labelled with its guidance setting."""
    drew = False
    for group, points in _series(rows, "is_mean", "fid", group_key).items():
        points = sorted(points, key=lambda p: _number(p[2].get(x_key)) or 0.0)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=group or None)
        for is_value, fid_value, row in points:
            ax.annotate(f"{row.get(x_key)}", (is_value, fid_value), textcoords="offset points", xytext=(4, 4))
        drew = True
    if drew and group_key:
        ax.legend()
    return drew


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    x_key: str,
    out_dir: str | os.PathLike,
    group_key: str | None = None,
) -> dict[str, Path]:
    """PNG plots of the sweep in `out_dir`: fid, sfid, inception_score, precision_recall, kid, class_accuracy
    and sec_per_sample against `x_key`, and fid_vs_is (the guidance trade-off curve). A plot whose
    metrics no row has is skipped. `group_key` draws one line per value (e.g. the guidance kind).
    Returns {plot name: path}.
    """
    out_dir = Path(out_dir)
    line_plots = {
        "fid": ("FID", ["fid"]),
        "sfid": ("sFID", ["sfid"]),
        "inception_score": ("Inception Score", ["is_mean"]),
        "precision_recall": ("precision / recall", ["precision", "recall"]),
        "kid": ("KID", ["kid_mean"]),
        "class_accuracy": ("class accuracy", ["class_accuracy"]),
        "sec_per_sample": ("seconds per sample", ["sec_per_sample"]),
    }
    paths: dict[str, Path] = {}
    for name, (y_label, y_keys) in line_plots.items():
        fig, ax = _new_axes(f"{y_label} vs {x_key}", AXIS_LABELS.get(x_key, x_key), y_label)
        if _plot_metric_lines(ax, rows, x_key, y_keys, group_key):
            paths[name] = _save_figure(fig, out_dir / f"{name}.png")
    fig, ax = _new_axes(f"FID vs Inception Score (labels: {x_key})", "Inception Score", "FID")
    if _plot_tradeoff(ax, rows, x_key, group_key):
        paths["fid_vs_is"] = _save_figure(fig, out_dir / "fid_vs_is.png")
    return paths


def _cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4g}" if math.isfinite(value) else ""
    return "" if value is None else str(value).replace("|", "\\|")


def _markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(col)) for col in columns) + " |" for row in rows]
    return lines


def _link(path: str | os.PathLike, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def describe_machine() -> str:
    """One line naming host, OS, Python, torch and the GPU if any, for the report's meta."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()} ({platform.platform()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, {gpu}"
    )


def write_report(
    rows: Sequence[Mapping[str, Any]],
    plots: Mapping[str, str | os.PathLike],
    grids: Mapping[str, str | os.PathLike],
    out_path: str | os.PathLike,
    title: str,
    meta: Mapping[str, Any],
    sections: Mapping[str, tuple[str, Sequence[Mapping[str, Any]]]] | None = None,
) -> Path:
    """Write a markdown report: meta (dataset, sample count, sampler, machine, time, ...), the best
    setting by FID, the results table, extra `sections` ({title: (note, rows)}, each a table after a
    note), and the plots and sample grids linked relative to `out_path`.

    plots: {name: png path} as returned by `plot_sweep`; grids: {caption: png path}.
    """
    out_path = Path(out_path)
    base = out_path.parent
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in meta.items()]
    best = best_row(rows, "fid")
    lines += ["", "## Best setting (lowest FID)", ""]
    lines += _markdown_table([best]) if best is not None else ["No row has a finite FID."]
    lines += ["", "## Results", ""] + (_markdown_table(rows) if rows else ["No results."])
    for heading, (note, section_rows) in (sections or {}).items():
        lines += ["", f"## {heading}", "", note, ""] + (_markdown_table(section_rows) if section_rows else [])
    if plots:
        lines += ["", "## Plots"]
        for name, path in plots.items():
            lines += ["", f"![{name}]({_link(path, base)})"]
    if grids:
        lines += ["", "## Samples"]
        for caption, path in grids.items():
            lines += ["", f"### {caption}", "", f"![{caption}]({_link(path, base)})"]
    return atomic_write_text(out_path, "\n".join(lines) + "\n")
