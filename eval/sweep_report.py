"""The report side of a sweep: the finished settings' metrics.json collected into rows, a terminal table,
and results.csv/json, plots and report.md."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.io import read_json
from eval.report import best_row, describe_machine, plot_sweep, write_report, write_results
from eval.sampler_sweep import network_evaluations
from eval.scoring import PROVENANCE_KEYS
from lightning_modules.generation import GUIDANCE_KINDS

# Identity columns of a metrics.json: kept there (resume, report filtering), left out of the tables.
HASH_KEYS = ("config_hash", "samples_hash", "sweep_hash")
# What the numbers were computed with (feature net, weights, reference, IS convention, seeds): in every row of
# results.csv/json, and in report.md once, in the header, when all rows agree (else as table columns).
SCORING_KEYS = (*PROVENANCE_KEYS, "seeds")

__all__ = ["HASH_KEYS", "TABLE_COLUMNS", "collect_rows", "format_table", "table_rows", "write_sweep_report"]


NFE_NOTE = (
    "nfe: U-Net evaluations per sample (one per sampling step; classifier-free guidance at s != 1 runs the "
    "conditional and unconditional halves, counted as two; classifier-guidance gradients are not counted). "
    "sec_per_sample: wall seconds of sampling per sample (all ranks together)."
)


def _derived(row: Mapping[str, Any]) -> dict[str, Any]:
    """nfe, sec_per_sample and (in a sampler sweep) the curve a row belongs to: sampler config and scale."""
    out: dict[str, Any] = {"nfe": network_evaluations(row)}
    seconds, n = row.get("sampling_seconds"), row.get("num_samples")
    out["sec_per_sample"] = float(seconds) / int(n) if seconds is not None and n else None
    if row.get("sampler_config") is not None:
        scale = row.get("cfg_scale") if row.get("guidance") != "classifier" else None
        scales = [f"s={scale:g}" if scale is not None else "", f"s_cls={row.get('cls_scale'):g}"
                  if row.get("guidance") != "cfg" else ""]  # fmt: skip
        out["curve"] = " ".join([str(row["sampler_config"]), *filter(None, scales)])
    return out


def table_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows without their hash columns (those stay in each metrics.json), with the derived columns nfe,
    sec_per_sample and, in a sampler sweep, curve (`NFE_NOTE`): what tables, plots and W&B show."""
    return [{**{k: v for k, v in row.items() if k not in HASH_KEYS}, **_derived(row)} for row in rows]


def _sort_key(row: Mapping[str, Any]) -> tuple:
    kind = (
        GUIDANCE_KINDS.index(row["guidance"])
        if row.get("guidance") in GUIDANCE_KINDS
        else len(GUIDANCE_KINDS)
    )
    chain = (str(row.get("sampler_config") or ""), row.get("num_steps") or 0)
    return (kind, *chain, row.get("cls_scale") or 0.0, row.get("cfg_scale") or 0.0, str(row.get("setting")))


def collect_rows(out_dir: str | os.PathLike, sweep_hash: str | None = None) -> list[dict[str, Any]]:
    """metrics.json of every setting directory under `out_dir`, sorted by kind and scales; with
    `sweep_hash`, only settings made with the same models, sampler, sample count and scorer."""
    rows = []
    for path in sorted(Path(out_dir).glob("*/metrics.json")):
        metrics = read_json(path)
        if metrics is not None and (sweep_hash is None or metrics.get("sweep_hash") == sweep_hash):
            rows.append(metrics)
    return sorted(rows, key=_sort_key)


def _axes(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """(x key, group key) of the plots: CFG scale (grouped by s_cls when several), or s_cls alone; in a
    sampler sweep the number of network evaluations, one line per sampler and scale (`curve`)."""
    if any(row.get("curve") for row in rows):
        return "nfe", "curve"
    kinds = {row.get("guidance") for row in rows}
    if kinds == {"classifier"}:
        return "cls_scale", None
    cls_values = {row.get("cls_scale") for row in rows if row.get("guidance") != "classifier"}
    return "cfg_scale", ("cls_scale" if len(cls_values) > 1 else None)


TABLE_COLUMNS = ("setting", "cfg_scale", "cls_scale", "nfe", "fid", "sfid", "is_mean", "precision", "recall",
                 "kid_mean", "class_accuracy", "sec_per_sample")  # fmt: skip


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of the main columns, for the terminal."""
    columns = [c for c in TABLE_COLUMNS if any(row.get(c) is not None for row in rows)]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


NFE_COLUMNS = ("curve", "sampler", "num_steps", "nfe", "fid", "class_accuracy", "precision", "recall",
               "sec_per_sample")  # fmt: skip


def _nfe_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The sampler sweep's rows by curve and NFE, with the columns of `NFE_COLUMNS` they have."""
    ordered = sorted(rows, key=lambda r: (str(r.get("curve")), r.get("nfe") or 0))
    columns = [c for c in NFE_COLUMNS if any(r.get(c) is not None for r in rows)]
    return [{c: r.get(c) for c in columns} for r in ordered]


def _shared_scoring(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({scoring key: value} of the `SCORING_KEYS` every row has with one value, the rows without them)."""
    shared = {}
    for key in SCORING_KEYS:
        values = {str(row.get(key)) for row in rows}
        if rows and len(values) == 1 and all(key in row for row in rows):
            shared[key] = rows[0][key]
    return shared, [{k: v for k, v in row.items() if k not in shared} for row in rows]


def write_sweep_report(
    out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], title: str, meta: Mapping[str, Any]
) -> dict[str, Any]:
    """results.csv/json, plots/*.png and report.md (plots and each setting's grid embedded) in `out_dir`.

    Returns {"results_csv", "results_json", "plots": {name: path}, "grids": {setting: path}, "report",
    "x_key"}. Hash columns are kept out of the tables (they stay in each metrics.json).
    """
    out_dir = Path(out_dir)
    table = table_rows(rows)
    csv_path, json_path = write_results(table, out_dir)
    x_key, group_key = _axes(table)
    plots = plot_sweep(table, x_key, out_dir / "plots", group_key=group_key) if table else {}
    grids = {
        row["setting"]: out_dir / row["grid"] for row in table if (out_dir / str(row.get("grid"))).is_file()
    }
    best = best_row(table, "fid")
    shared, shown = _shared_scoring(table)
    meta = {**meta, **shared, "best setting (FID)": best["setting"] if best else None, "machine": describe_machine()}
    sections = {}
    if x_key == "nfe":
        sections["Quality against network evaluations"] = (NFE_NOTE, _nfe_table(table))
    report = write_report(shown, plots, grids, out_dir / "report.md", title, meta, sections=sections)
    return {"results_csv": csv_path, "results_json": json_path, "plots": plots, "grids": grids,
            "report": report, "x_key": x_key}  # fmt: skip

