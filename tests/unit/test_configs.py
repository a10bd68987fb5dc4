"""Every config in conf/ composes (and the stage modules instantiate), including every experiment."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

import pipeline  # noqa: F401  (registers the config resolvers)

CONF = Path(__file__).resolve().parents[2] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "default")


def compose_cfg(root: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=root, overrides=overrides, return_hydra_config=False)


def resolve(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


ROOTS = sorted(p.stem for p in CONF.glob("*.yaml"))
FOLDER = ["data.source.root=/tmp/images", "data.num_classes=3"]


@pytest.mark.parametrize("root", ROOTS)
def test_root_configs_compose(root):
    resolve(compose_cfg(root, []))


@pytest.mark.parametrize("stage", options("stage"))
@pytest.mark.parametrize("experiment", [None, *options("experiment")])
def test_stage_x_experiment_composes(stage, experiment):
    overrides = [f"stage={stage}"] + ([f"experiment={experiment}"] if experiment else [])
    resolve(compose_cfg("train", overrides))


@pytest.mark.parametrize(
    "group,extra",
    [("trainer", []), ("logger", []), ("debug", []), ("data", FOLDER), ("paths", [])],
)
def test_every_group_option_composes(group, extra):
    for option in options(group):
        resolve(compose_cfg("train", [f"{group}={option}", *(extra if option in ("imagefolder", "webdataset") else [])]))


def test_callbacks_group_has_a_file_per_stage():
    # `callbacks: ${stage}` selects conf/callbacks/<stage>.yaml: a stage without one would not compose, an
    # option that is neither a stage nor `none` would never be selected.
    assert set(options("callbacks")) == {*options("stage"), "none"}


@pytest.mark.parametrize("stage", options("stage"))
@pytest.mark.parametrize("choice", ["default", "none"])
def test_stage_callbacks_compose_and_are_built(stage, choice, tmp_path):
    from pipeline.builders import build_callbacks

    overrides = [f"stage={stage}"] + (["callbacks=none"] if choice == "none" else [])
    cfg = compose_cfg("train", overrides)
    resolve(cfg)
    expected = OmegaConf.load(CONF / "callbacks" / f"{stage if choice == 'default' else 'none'}.yaml") or {}
    assert set(cfg.callbacks) == set(expected)
    if "reconstruction_fid" in cfg.callbacks:  # it loads its feature net: checked in the autoencoder tests
        cfg.callbacks.reconstruction_fid.checkpoint = None
    built = {type(cb).__name__ for cb in build_callbacks(cfg, tmp_path)}
    assert {c._target_.rsplit(".", 1)[1] for c in cfg.callbacks.values()} <= built


def test_model_group_options_compose():
    for sub in sorted(p.name for p in (CONF / "model").iterdir() if p.is_dir()):
        for option in options(f"model/{sub}"):
            cfg = compose_cfg("train", [f"model/{sub}={option}"]) if _used_by_default(sub) else None
            if cfg is not None:
                resolve(cfg)


def _used_by_default(sub: str) -> bool:
    return sub in (compose_cfg("train", []).get("model") or {})


@pytest.mark.parametrize("stage", options("stage"))
def test_stage_module_instantiates(stage, tiny_data):
    cfg = compose_cfg("train", [f"stage={stage}", "experiment=fashion_mnist_quick", f"paths.data_dir={tiny_data}"])
    if cfg.stage.get("requires_upstream_checkpoints"):
        pytest.skip(f"stage {stage} loads upstream checkpoints: instantiated in its integration test")
    module = instantiate(cfg.stage.module)
    assert sum(p.numel() for p in module.parameters()) > 0


def test_datamodule_and_trainer_instantiate(tiny_data):
    cfg = compose_cfg("train", ["experiment=fashion_mnist_quick", f"paths.data_dir={tiny_data}"])
    dm = instantiate(cfg.data.datamodule)
    assert dm.num_classes == cfg.data.num_classes
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps


def test_experiment_stage_files_name_an_experiment_and_a_stage():
    """`optional experiment_stage: ${experiment}/${stage}` skips a file that names nothing, so a misspelt
    experiment or stage would be ignored silently: every file must name both."""
    root = CONF / "experiment_stage"
    files = sorted(root.rglob("*.yaml"))
    assert files, "no experiment_stage files: the imagenet256_ldm per-stage settings are gone"
    experiments, stages = set(options("experiment")), {*options("stage"), "evaluate"}
    for path in files:
        rel = path.relative_to(root)
        assert len(rel.parts) == 2, f"{rel}: expected <experiment>/<stage>.yaml"
        assert rel.parts[0] in experiments, f"{rel}: no experiment {rel.parts[0]!r}"
        assert path.stem in stages, f"{rel}: no stage {path.stem!r}"


def test_experiment_stage_settings_reach_their_stage_only_and_the_command_line_wins():
    ldm = ["experiment=imagenet256_ldm"]
    ae = compose_cfg("train", [*ldm, "stage=autoencoder"])
    assert ae.trainer.max_steps == 200000 and ae.stage.module.loss.disc_start == 50001
    assert ae.stage.checkpoint_every_n_steps == 2000  # the experiment's own value still reaches the stage
    assert ae.model.perceptual._target_.endswith("LPIPSVGG") and ae.callbacks.reconstruction_fid is None
    assert ae.callbacks.reconstruction_grid.num_images == 8  # the other callbacks of the stage stay
    assert ae.stage.module.perceptual._target_.endswith("LPIPSVGG")  # what the module is built with
    diffusion = compose_cfg("train", [*ldm, "stage=diffusion"])
    assert diffusion.trainer.max_steps == 178000 and diffusion.stage.module.optimizer.lr == 1.0e-4
    assert diffusion.callbacks.sample_grids.every_n_steps == 10000
    assert not diffusion.data.hflip  # the latent cache holds unflipped images
    classifier = compose_cfg("train", [*ldm, "stage=classifier"])
    assert classifier.trainer.max_steps == 300000 and classifier.model.classifier.model_channels == 128
    feature_net = compose_cfg("train", [*ldm, "stage=feature_net"])
    assert feature_net.trainer.max_steps == 1500  # no file for it: the stage's own default
    sweep = compose_cfg("evaluate", ldm)
    assert sweep.model.features._target_.endswith("InceptionFeatures") and sweep.num_samples == 50000
    assert compose_cfg("evaluate", [*ldm, "guidance=classifier"]).model.features._target_.endswith("InceptionFeatures")
    # other experiments keep the stage defaults
    quick = compose_cfg("train", ["experiment=fashion_mnist_quick", "stage=autoencoder"])
    assert quick.trainer.max_steps == 1500 and quick.model.perceptual._target_.endswith("domain_perceptual")
    # the command line beats the experiment's stage file, and debug still applies after it
    cli = compose_cfg("train", [*ldm, "stage=autoencoder", "trainer.max_steps=7", "stage.module.optimizer.lr=0.1"])
    assert cli.trainer.max_steps == 7 and cli.stage.module.optimizer.lr == 0.1
    assert compose_cfg("train", [*ldm, "stage=diffusion", "debug=fdr"]).trainer.fast_dev_run


@pytest.mark.parametrize("sampler", options("sampler"))
def test_every_sampler_composes_and_instantiates(sampler):
    """Each conf/sampler option, as the evaluation's sampler and as the training grids' one."""
    cfg = compose_cfg("evaluate", [f"sampler={sampler}"])
    assert type(instantiate(resolve(cfg)["sampler"])).__module__.startswith("lightning_modules.diffusion.")
    train = compose_cfg("train", ["stage=diffusion", f"sampler@stage.module.sampler={sampler}"])
    resolve(train)


def test_iddpm_experiment_turns_the_learned_variance_on_for_the_diffusion_stage_only():
    iddpm = compose_cfg("train", ["experiment=fashion_mnist_iddpm", "stage=diffusion"])
    assert iddpm.stage.module.variance_type == "learned_range" and iddpm.stage.module.vlb_weight == 1e-3
    assert iddpm.stage.module.sampler.num_steps == 10  # the quick demo's grid sampler it extends
    quick = compose_cfg("train", ["experiment=fashion_mnist_quick", "stage=diffusion"])
    assert quick.stage.module.variance_type == "fixed_small"
    assert compose_cfg("evaluate", ["experiment=fashion_mnist_iddpm"]).num_samples == 1000
