"""Sampler x step-count sweeps: their points (names, rows, hashes), network evaluations, the sampler chains
built from conf/sampler, bad `sweep.*` input, and a whole sweep through `pipeline.evaluate.evaluate`
(resume, sweep_index, best_scale_from, the report's NFE table and plots)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval.job import SweepJob
from eval.report import best_row
from eval.sampler_sweep import SweepSetting, cross_settings, network_evaluations, step_counts
from eval.settings import expand_settings
from eval.sweep_report import NFE_NOTE, table_rows
from lightning_modules.diffusion import DDIMSampler, DPMSolverPP2MSampler
from lightning_modules.generation import GuidanceSetting
from pipeline.evaluate import evaluate, sampler_chains, sweep_points
from tests.unit.test_sweep import CountingGenerator, FakeScorer, _compose, run_dir  # noqa: F401

PNG = b"\x89PNG\r\n\x1a\n"


def test_points_are_sampler_major_and_named_by_sampler_and_steps() -> None:
    guidance = expand_settings("cfg", [1, 3])
    chains = [("ddim", DDIMSampler(num_steps=5)), ("dpmpp_2m", DPMSolverPP2MSampler(num_steps=10))]
    points = cross_settings(guidance, chains)
    assert [p.name for p in points] == ["ddim_n5_cfg_s1", "ddim_n5_cfg_s3", "dpmpp_2m_n10_cfg_s1",
                                        "dpmpp_2m_n10_cfg_s3"]  # fmt: skip
    assert points[3].as_row() == {**guidance[1].as_row(), "setting": "dpmpp_2m_n10_cfg_s3",
                                  "sampler_config": "dpmpp_2m"}  # fmt: skip
    assert points[3].cls_scale == 0.0


def test_a_plain_guidance_sweep_keeps_its_names_rows_and_hashes(tmp_path) -> None:
    """Without sweep.samplers/steps, finished settings of an older tree are still recognised as done."""
    guidance = GuidanceSetting("cfg", cfg_scale=3.0)
    point = cross_settings([guidance], None)[0]
    assert point == SweepSetting(guidance) and point.name == "cfg_s3" and point.as_row() == guidance.as_row()
    job = SweepJob(out_dir=tmp_path, settings=[point], generator=CountingGenerator(), scorer=FakeScorer(),
                   num_samples=4, num_classes=2, progress=False, log=lambda _: None)  # fmt: skip
    assert job.samples_hash(point) == job.samples_hash(guidance)
    assert job.metrics_hash(point) == job.metrics_hash(guidance)


def test_network_evaluations_count_both_cfg_passes() -> None:
    assert network_evaluations({"guidance": "cfg", "cfg_scale": 1.0, "num_steps": 10}) == 10
    assert network_evaluations({"guidance": "cfg", "cfg_scale": 3.0, "num_steps": 10}) == 20
    assert network_evaluations({"guidance": "both", "cfg_scale": 1.0, "cls_scale": 2.0, "num_steps": 7}) == 7
    assert network_evaluations({"guidance": "classifier", "cfg_scale": None, "num_steps": 7}) == 7
    assert network_evaluations({"guidance": "cfg", "cfg_scale": 3.0}) is None
    row = {"guidance": "cfg", "cfg_scale": 2.0, "num_steps": 5, "sampling_seconds": 3.0, "num_samples": 60,
           "sampler_config": "dpmpp_2m", "config_hash": "h"}  # fmt: skip
    shown = table_rows([row])[0]
    assert shown["nfe"] == 10 and shown["sec_per_sample"] == 0.05 and shown["curve"] == "dpmpp_2m s=2"
    assert "config_hash" not in shown and "counted as two" in NFE_NOTE


def test_sampler_chains_from_conf(tiny_data, run_dir) -> None:  # noqa: F811
    cfg = _compose(tiny_data, run_dir, "sweep.samplers=[ddim,dpmpp_2m]", "sweep.steps=[5,10]")
    chains = sampler_chains(cfg)
    assert [(name, type(s).__name__, s.num_steps) for name, s in chains] == [
        ("ddim", "DDIMSampler", 5), ("ddim", "DDIMSampler", 10),
        ("dpmpp_2m", "DPMSolverPP2MSampler", 5), ("dpmpp_2m", "DPMSolverPP2MSampler", 10)]  # fmt: skip
    assert {s.spacing for _, s in chains} == {"leading", "trailing"}  # each config's own
    same = sampler_chains(
        _compose(tiny_data, run_dir, "sweep.samplers=[ddim,dpmpp_2m]", "sweep.spacing=trailing")
    )
    assert [(s.num_steps, s.spacing) for _, s in same] == [(50, "trailing"), (20, "trailing")]
    only_steps = sampler_chains(_compose(tiny_data, run_dir, "sampler=dpmpp_2m", "sweep.steps=[4]"))
    assert [(name, s) for name, s in only_steps] == [
        ("DPMSolverPP2MSampler", DPMSolverPP2MSampler(num_steps=4))
    ]
    assert sampler_chains(_compose(tiny_data, run_dir)) is None
    assert (
        len(sweep_points(_compose(tiny_data, run_dir, "sweep.steps=[5,10]", "guidance.scales=[1,2,3]"))) == 6
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["sweep.samplers=[ddim,euler]"], r"sweep.samplers: no sampler config 'euler'.*dpmpp_2m"),
        (["sweep.samplers=[ddim,ddim]"], "names a sampler twice"),
        (["sweep.samplers=[]"], "non-empty list"),
        (["sweep.steps=[5,0]"], r"positive integers, but 0"),
        (["sweep.steps=[5,2.5]"], r"positive integers, but 2.5"),
        (["sweep.steps=[5,5]"], "twice"),
        (["sweep.best_scale_from=nothing_here"], r"sweep.best_scale_from=nothing_here: .*results.json"),
    ],
)
def test_bad_sweep_keys_are_refused_before_sampling(tiny_data, run_dir, overrides, match) -> None:  # noqa: F811
    cfg = _compose(tiny_data, run_dir, "perceptual_feature_net=null", *overrides)
    with pytest.raises(ValueError, match=match):
        evaluate(cfg)
    assert not (run_dir / "eval").exists()


def test_step_counts() -> None:
    assert step_counts(None) is None and step_counts([5, 10.0]) == [5, 10]
    with pytest.raises(ValueError, match="non-empty"):
        step_counts("5")


def test_whole_sampler_sweep_resumes_distributes_and_reports(tiny_data, run_dir) -> None:  # noqa: F811
    common = ["perceptual_feature_net=null", "batch_size=20", "grid_per_class=2"]
    # The CFG sweep whose best scale the sampler sweep takes.
    evaluate(_compose(tiny_data, run_dir, *common, "guidance.scales=[1,3]", "sampler.num_steps=2"))
    cfg_rows = json.loads((run_dir / "eval" / "cfg" / "results.json").read_text())
    best = best_row(cfg_rows, "fid")["cfg_scale"]
    sweep = ["guidance.name=samplers", "sweep.samplers=[ddim,dpmpp_2m]", "sweep.steps=[2,3]",
             "sweep.best_scale_from=cfg"]  # fmt: skip
    names = [f"{s}_n{n}_cfg_s{best:g}" for s in ("ddim", "dpmpp_2m") for n in (2, 3)]
    # One setting alone, as a Slurm array task would (sweep_index), then the rest: the first is skipped.
    evaluate(_compose(tiny_data, run_dir, *common, *sweep, "sweep_index=3"))
    out = run_dir / "eval" / "samplers"
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "plots") == [names[3]]
    rows = evaluate(_compose(tiny_data, run_dir, *common, *sweep))
    first = json.loads((out / names[3] / "metrics.json").read_text())
    assert [r["setting"] for r in rows] == names
    assert (
        rows[3]["samples_hash"] == first["samples_hash"]
        and rows[3]["sampling_seconds"] == first["sampling_seconds"]
    )
    assert [(r["sampler"], r["num_steps"], r["cfg_scale"]) for r in rows] == [
        ("DDIMSampler", 2, best), ("DDIMSampler", 3, best),
        ("DPMSolverPP2MSampler", 2, best), ("DPMSolverPP2MSampler", 3, best)]  # fmt: skip
    assert len({r["samples_hash"] for r in rows}) == 4 and len({r["sweep_hash"] for r in rows}) == 1
    # the two samplers draw different images from the same seeds
    with np.load(out / names[1] / "samples.npz") as a, np.load(out / names[3] / "samples.npz") as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])
    results = json.loads((out / "results.json").read_text())
    passes = 1 if best == 1 else 2
    assert [r["nfe"] for r in results] == [2 * passes, 3 * passes, 2 * passes, 3 * passes]
    assert all(r["sec_per_sample"] > 0 for r in results)
    report = (out / "report.md").read_text()
    assert "## Quality against network evaluations" in report and NFE_NOTE in report
    assert f"dpmpp_2m s={best:g}" in report and "lowest-FID setting of sweep `cfg`" in report
    for plot in ("fid", "class_accuracy", "sec_per_sample"):
        assert (out / "plots" / f"{plot}.png").read_bytes().startswith(PNG), plot
    # A re-run samples nothing.
    again = evaluate(_compose(tiny_data, run_dir, *common, *sweep))
    assert [r["config_hash"] for r in again] == [r["config_hash"] for r in rows]


def test_wandb_gets_the_nfe_table_and_one_line_per_curve(tmp_path, monkeypatch) -> None:
    import wandb

    from eval.wandb_log import log_to_wandb

    lines = []
    real_line = wandb.plot.line
    monkeypatch.setattr(wandb.plot, "line", lambda table, x, y, stroke=None, title="": lines.append(
        (x, y, stroke)) or real_line(table, x, y, stroke=stroke, title=title))  # fmt: skip
    rows = [{"setting": f"{s}_n{n}_cfg_s3", "guidance": "cfg", "cfg_scale": 3.0, "cls_scale": 0.0, "fid": 1.0 / n,
             "num_steps": n, "sampler_config": s, "sampling_seconds": 1.0, "num_samples": 10}
            for s in ("ddim", "dpmpp_2m") for n in (2, 4)]  # fmt: skip
    log_to_wandb(rows, {"x_key": "nfe", "plots": {}, "grids": {}}, run_dir=tmp_path, run_id="t1", project="p",
                 group="g", name="n", offline=True)  # fmt: skip
    assert ("nfe", "fid", "curve") in lines and ("nfe", "sec_per_sample", "curve") in lines


def test_slurm_array_size_counts_sampler_points_before_the_best_scale_exists(tiny_data, run_dir) -> None:  # noqa: F811
    cfg = _compose(tiny_data, run_dir, "sweep.samplers=[ddim,dpmpp_2m]", "sweep.steps=[5,10,20]",
                   "sweep.best_scale_from=cfg")  # fmt: skip
    assert len(sweep_points(cfg, for_count=True)) == 6
    with pytest.raises(ValueError, match="run that sweep first"):
        sweep_points(cfg)
