"""W&B logging of a finished sweep: results table, plots and sample grids in one run."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from eval.report import best_row
from eval.sweep_report import table_rows

__all__ = ["log_to_wandb"]


def log_to_wandb(
    rows: Sequence[Mapping[str, Any]],
    outputs: Mapping[str, Any],
    run_dir: str | os.PathLike,
    run_id: str,
    project: str,
    group: str,
    name: str,
    entity: str | None = None,
    tags: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    offline: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> str:
    """Log the results table, the plots (images and W&B line plots) and the sample grids to one W&B run
    (job_type "evaluate"); the stable `run_id` makes a re-run continue the same run. Returns its dir."""
    import wandb

    run = wandb.init(dir=str(run_dir), id=run_id, resume="allow", project=project, entity=entity, group=group,
                     job_type="evaluate", name=name, tags=list(tags), config=dict(config or {}),
                     mode="offline" if offline else "online", settings=dict(settings or {}))  # fmt: skip
    try:
        shown = table_rows(rows)
        columns = list(dict.fromkeys(k for row in shown for k in row))
        table = wandb.Table(
            columns=columns, data=[[_wandb_cell(row.get(c)) for c in columns] for row in shown]
        )
        logs: dict[str, Any] = {"eval/results": table}
        x_key = outputs.get("x_key", "cfg_scale")
        # A sampler sweep (x = nfe): one line per sampler and scale (`curve`).
        stroke = "curve" if x_key == "nfe" and "curve" in columns else None
        for metric in ("fid", "sfid", "is_mean", "precision", "recall", "class_accuracy", "sec_per_sample"):
            if x_key in columns and metric in columns:
                logs[f"eval/{metric}_vs_{x_key}"] = wandb.plot.line(
                    table, x_key, metric, stroke=stroke, title=f"{metric} vs {x_key}"
                )
        logs |= {f"eval/plots/{k}": wandb.Image(str(p)) for k, p in outputs.get("plots", {}).items()}
        logs |= {
            f"eval/grids/{k}": wandb.Image(str(p), caption=k) for k, p in outputs.get("grids", {}).items()
        }
        run.log(logs)
        best = best_row(shown, "fid")
        if best is not None:
            run.summary.update({f"best/{k}": v for k, v in best.items() if isinstance(v, int | float | str)})
        return str(run.dir)
    finally:
        run.finish()


def _wandb_cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value
