"""Sweep results on disk: CSV/JSON round trip, valid PNG plots and grids, report links, atomic writes."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.images import make_grid_png
from core.io import atomic_open, atomic_write_text
from eval import report

ROWS = [
    {"guidance": "cfg", "scale": 1.0, "fid": 30.5, "is_mean": 5.0, "is_std": 0.2, "precision": 0.5,
     "recall": 0.7, "kid_mean": 0.02, "kid_std": 0.001, "class_accuracy": 0.6, "n": 100},
    {"guidance": "cfg", "scale": 3.0, "fid": 12.25, "is_mean": 7.5, "is_std": 0.3, "precision": 0.8,
     "recall": 0.5, "kid_mean": 0.01, "kid_std": 0.001, "class_accuracy": 0.9, "n": 100},
    {"guidance": "cfg", "scale": 2.0, "fid": 15.0, "is_mean": 6.5, "is_std": 0.25, "precision": 0.7,
     "recall": 0.6, "kid_mean": 0.012, "kid_std": 0.001, "class_accuracy": 0.8, "n": 100},
]  # fmt: skip


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


def test_results_round_trip(tmp_path):
    rows = [*ROWS, {"scale": 5.0, "fid": float("nan"), "note": "a|b", "extra": np.float64(0.125)}]
    csv_path, json_path = report.write_results(rows, tmp_path / "out")
    assert (csv_path.name, json_path.name) == ("results.csv", "results.json")

    with open(csv_path, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["guidance", "scale", "fid", "is_mean", "is_std", "precision", "recall",
                             "kid_mean", "kid_std", "class_accuracy", "n", "note", "extra"]  # fmt: skip
    for original, back in zip(rows[:3], read[:3]):
        for key, value in original.items():
            assert (float(back[key]) == value) if not isinstance(value, str) else back[key] == value
    assert read[3]["fid"] == "" and read[3]["guidance"] == "" and float(read[3]["extra"]) == 0.125

    loaded = json.loads(json_path.read_text())
    assert loaded[:3] == ROWS
    assert loaded[3] == {"scale": 5.0, "fid": None, "note": "a|b", "extra": 0.125}
    assert _no_temp_files(tmp_path)


def test_plot_sweep_makes_valid_pngs(tmp_path):
    paths = report.plot_sweep(ROWS, "scale", tmp_path / "plots")
    assert set(paths) == {"fid", "inception_score", "precision_recall", "kid", "class_accuracy", "fid_vs_is"}
    for name, path in paths.items():
        assert path == tmp_path / "plots" / f"{name}.png"
        assert _is_png(path)
    assert _no_temp_files(tmp_path)


def test_plot_sweep_skips_missing_metrics_and_groups(tmp_path):
    rows = [{k: v for k, v in row.items() if k not in ("class_accuracy", "kid_mean")} for row in ROWS]
    rows += [{**row, "guidance": "classifier"} for row in rows]
    paths = report.plot_sweep(rows, "scale", tmp_path, group_key="guidance")
    assert set(paths) == {"fid", "inception_score", "precision_recall", "fid_vs_is"}
    assert all(_is_png(p) for p in paths.values())


def test_make_grid_png_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 8, 6, 1), dtype=np.uint8)
    path = make_grid_png(images, nrow=3, path=tmp_path / "grid.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2)
        grid = np.asarray(im)
    # Image 4 sits in row 1, column 1 (0-based), after the 2-pixel padding.
    np.testing.assert_array_equal(grid[2 + 10 : 2 + 10 + 8, 2 + 8 : 2 + 8 + 6], images[4, ..., 0])
    assert grid[:2].max() == 0 and grid[:, 2 + 2 * 8 + 6 :].max() == 0  # padding stays black

    rgb = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    labelled = make_grid_png(
        rgb, nrow=2, path=tmp_path / "labelled.png", labels=["coat", 3, "bag", "x"]
    )
    with Image.open(labelled) as im:
        assert im.mode == "RGB" and im.size == (2 * 18 + 2, 2 * (16 + 12 + 2) + 2)
        np.testing.assert_array_equal(np.asarray(im)[2:18, 2:18], rgb[0])
    with pytest.raises(ValueError, match="labels"):
        make_grid_png(rgb, nrow=2, path=tmp_path / "bad.png", labels=["one"])


def test_write_report_links_plots_and_grids(tmp_path):
    sweep = tmp_path / "eval" / "sweep"
    plots = report.plot_sweep(ROWS, "scale", sweep / "plots")
    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    grids = {f"scale {row['scale']}": make_grid_png(images, 2, sweep / f"s{row['scale']}" / "grid.png")
             for row in ROWS}  # fmt: skip
    meta = {"dataset": "fashion_mnist", "samples per scale": 100, "sampler": "ddim 50 steps",
            "machine": report.describe_machine(), "time": "2024-01-01 00:00"}  # fmt: skip
    path = report.write_report(ROWS, plots, grids, sweep / "report.md", "Guidance sweep", meta)
    text = path.read_text()

    assert text.startswith("# Guidance sweep")
    for value in ("fashion_mnist", "ddim 50 steps", "2024-01-01 00:00"):
        assert value in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(plots) + len(grids)
    for link in links:
        assert not Path(link).is_absolute() and (sweep / link).is_file()
    assert "plots/fid_vs_is.png" in links and "s3.0/grid.png" in links

    best = text.split("## Best setting (lowest FID)")[1].split("## Results")[0]
    assert "12.25" in best and "30.5" not in best
    results = text.split("## Results")[1].split("## Plots")[0]
    assert sum(line.startswith("| cfg |") for line in results.splitlines()) == len(ROWS)
    assert _no_temp_files(tmp_path)


def test_best_row_ignores_missing_and_nan():
    rows = [{"fid": float("nan")}, {"fid": 3.0, "s": 1}, {"s": 2}, {"fid": 2.0, "s": 3}]
    assert report.best_row(rows)["s"] == 3
    assert report.best_row([{"fid": math.inf}]) is None


def test_atomic_write_replaces_or_leaves_untouched(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("half-written")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file.txt", "sub"]
