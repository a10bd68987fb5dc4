"""core.secrets: credentials found by key name and by value, the rest of each string kept; no false positives."""

from __future__ import annotations

import pytest

from core.secrets import MASK, is_secret_key, scrub, scrub_argv, scrub_text, secret_env_values
from pipeline.common import save_config, scrub_secrets

NO_ENV: dict[str, str] = {}


@pytest.mark.parametrize("name", ["api_key", "apiKey", "APIKey", "apikey", "WANDB_API_KEY", "HF_TOKEN", "hf_token",
                                  "token", "access_token", "password", "db_password", "client_secret",
                                  "AWS_SECRET_ACCESS_KEY", "X-Amz-Security-Token", "logger.wandb.api_key",
                                  "+data.auth_token", "Authorization", "private_key", "credentials"])  # fmt: skip
def test_secret_key_names(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", ["num_tokens", "max_tokens", "tokens", "tokenizer", "token_dropout", "pad_token",
                                  "eos_token", "pad_token_id", "key", "__key__", "sort_key", "keys", "monkey",
                                  "secretary", "passthrough", "author", "authors", "keyframe", "AWS_ACCESS_KEY_ID",
                                  "HF_TOKEN_PATH", "password_file", "num_heads", "config_hash"])  # fmt: skip
def test_ordinary_key_names(name):
    assert not is_secret_key(name)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("https://alice:s3cr3tpw@example.org/shards/train-{0..9}.tar",
         "https://alice:***@example.org/shards/train-{0..9}.tar"),
        ("https://alice:p@ss@example.org/x.tar", "https://alice:***@example.org/x.tar"),
        ("https://ghp_abcdefghijklmnopqrstuvwxyz0123456789@github.com/o/r",
         "https://***@github.com/o/r"),
        ("ssh://git@github.com/o/r.git", "ssh://git@github.com/o/r.git"),
        ("https://acct.blob.core.windows.net/c/train-000.tar?sv=2022-11-02&se=2030-01-01&sp=r&sig=AbC%2Bdef%3D",
         "https://acct.blob.core.windows.net/c/train-000.tar?sv=2022-11-02&se=2030-01-01&sp=r&sig=***"),
        ("https://b.s3.amazonaws.com/k.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F2024"
         "&X-Amz-Signature=deadbeef&X-Amz-Security-Token=FQoG",
         "https://b.s3.amazonaws.com/k.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
         "&X-Amz-Signature=***&X-Amz-Security-Token=***"),
        ("https://h/x?token=abc123&page=2", "https://h/x?token=***&page=2"),
        ("pipe:curl -s -H 'Authorization: Bearer eyJhbGciOi.x' https://h/train-{000..009}.tar",
         "pipe:curl -s -H 'Authorization: Bearer ***' https://h/train-{000..009}.tar"),
        ('pipe:curl -H "Authorization: token abcdef123456" https://h/a.tar',
         'pipe:curl -H "Authorization: token ***" https://h/a.tar'),
        ("pipe:curl -u alice:hunter22 https://h/a.tar", "pipe:curl -u alice:*** https://h/a.tar"),
        ("pipe:gsutil cat gs://b/a.tar --token abcdef", "pipe:gsutil cat gs://b/a.tar --token ***"),
        ("+logger.wandb.api_key=0123456789abcdef", "+logger.wandb.api_key=***"),
        ("{'hf_token': 'abcdef12', 'num_tokens': 77}", "{'hf_token': '***', 'num_tokens': 77}"),
        ("X-API-Key: abcdef1234", "X-API-Key: ***"),
        ("my key is hf_abcdefghijklmnopqrstuvwxyzABCDEFGH ok", "my key is *** ok"),
        ("id AKIAIOSFODNN7EXAMPLE here", "id *** here"),
    ],
)  # fmt: skip
def test_values_scrubbed_keeping_the_rest(raw, clean):
    assert scrub_text(raw, NO_ENV) == clean


@pytest.mark.parametrize("text", [
    "[run] (1/2) feature_net_perceptual: running (not run yet): python -m pipeline.train stage=feature_net",
    "data.urls.train=/data/fashion_mnist/train-{00000..00003}.tar num_tokens=77 max_tokens=512",
    "https://example.org/shards/train-000.tar?page=2&split=train",
    "Epoch 0: 100%|##| 4/4 [00:01<00:00, loss=0.123, v_num=0]",
    "config_hash: 3f2a9c0d1e2b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e5d6c7b8a9f",
    "Basic statistics: 12 samples; a bearer of news",
    "sk-learn, task-based, the token embeddings",
    "pad_token: <pad>",
])  # fmt: skip
def test_ordinary_text_untouched(text):
    assert scrub_text(text, NO_ENV) == text


def test_environment_secret_values_masked_wherever_they_appear():
    env = {"HF_TOKEN": "plainvalue8d2kq93jfz", "MY_SERVICE_API_KEY": "zz-77-qq-plain", "NUM_TOKENS": "12345678901",
           "SHORT_TOKEN": "1", "HOME": "/root"}  # fmt: skip
    assert secret_env_values(env) == ["plainvalue8d2kq93jfz", "zz-77-qq-plain"]
    assert scrub_text("note=see plainvalue8d2kq93jfz and zz-77-qq-plain; 12345678901 /root", env) == (
        "note=see *** and ***; 12345678901 /root"
    )
    # ${oc.env:HF_TOKEN} resolved under an innocent key
    assert scrub({"stage": {"note": "plainvalue8d2kq93jfz"}}, env) == {"stage": {"note": MASK}}


def test_scrub_containers_masks_secret_keys_and_values_not_ordinary_keys():
    cfg = {
        "num_tokens": 77, "max_tokens": 512, "tokenizer": "bpe", "pad_token": "<pad>", "seed": 0,
        "logger": {"wandb": {"api_key": "abcdef", "tags": ["x"], "use_token": True, "token": None}},
        "data": {"urls": {"train": "https://u:pw123456@h/t.tar"}},
        "secrets": {"a": "x", "b": [1, 2]},
        "argv": ["--password", "hunter22"],
    }  # fmt: skip
    assert scrub(cfg, NO_ENV) == {
        "num_tokens": 77, "max_tokens": 512, "tokenizer": "bpe", "pad_token": "<pad>", "seed": 0,
        "logger": {"wandb": {"api_key": MASK, "tags": ["x"], "use_token": True, "token": None}},
        "data": {"urls": {"train": "https://u:***@h/t.tar"}},
        "secrets": {"a": MASK, "b": [MASK, MASK]},
        "argv": ["--password", "hunter22"],  # a secret as a separate list item is found only in a command line
    }  # fmt: skip
    assert scrub_argv(["python", "-m", "x", "--password", "hunter22"], NO_ENV)[-1] == "hunter22"
    assert " ".join(scrub_argv(["python", "-m", "x", "--password hunter22"], NO_ENV)).endswith("--password ***")


def test_pipeline_scrubber_is_the_core_one_and_saved_configs_keep_num_tokens(tmp_path):
    cfg = {"stage": {"num_tokens": 64}, "data": {"urls": {"train": "https://u:pw123456@h/t.tar?sig=abc"}}}
    assert scrub_secrets(cfg) == {"stage": {"num_tokens": 64}, "data": {"urls": {"train": "https://u:***@h/t.tar?sig=***"}}}
    text = save_config(cfg, tmp_path / "config.yaml").read_text()
    assert "num_tokens: 64" in text and "pw123456" not in text and "sig=***" in text


def test_slurm_jobs_get_named_variables_only(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from pipeline.run import Step
    from pipeline.slurm_chain import exported_names, stage_sbatch_argv

    env = {"PATH": "/bin", "HF_TOKEN": "plainvalue8d2kq93jfz", "WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40,
           "NCCL_DEBUG": "INFO", "LC_ALL": "C", "WANDB_SERVICE": "3-4242-unix-/tmp/wandb-4242/socket"}  # fmt: skip
    assert exported_names(["PATH", "LC_*", "WANDB_*", "NCCL_*", "TMPDIR"], env) == [
        "PATH", "LC_ALL", "WANDB_API_KEY", "WANDB_MODE", "NCCL_DEBUG"]  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    launcher = OmegaConf.load("conf/launcher/slurm.yaml")
    launcher.venv = "/opt/venv"
    step = Step("diffusion", "pipeline.train", "train", ["stage=diffusion"], False, ["+note=x"])
    export = next(a for a in stage_sbatch_argv(step, launcher, tmp_path, []) if a.startswith("--export="))
    names = export.removeprefix("--export=").split(",")
    assert "ALL" not in names and "HF_TOKEN" not in names and "PATH" in names and "WANDB_API_KEY" in names
    assert "k" * 40 not in export and "plainvalue8d2kq93jfz" not in export  # sbatch reads the values itself
    assert "WANDB_SERVICE" not in names  # a socket of this process: the job starts its own service


def test_slurm_error_messages_mask_the_command_line():
    from pipeline.slurm import SlurmError, _run

    with pytest.raises(SlurmError) as error:
        _run(["false", "data.urls.train=https://u:pw123456@h/t.tar?sig=abc"])
    assert "pw123456" not in str(error.value) and "u:***@h/t.tar?sig=***" in str(error.value)


def test_logging_filter_masks_what_handlers_print(caplog):
    import logging

    from core.secrets import ScrubbingFilter

    caplog.handler.addFilter(ScrubbingFilter())
    logging.getLogger("hydra.core.utils").error("Error executing job with overrides: %s", ["+x=https://u:pw123456@h"])
    assert "pw123456" not in caplog.text and "u:***@h" in caplog.text


def test_hydra_callback_writes_scrubbed_records_and_multirun_yaml(tmp_path):
    import os

    from hydra import compose, initialize_config_dir
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from pipeline.hydra_output import ScrubbedHydraOutput

    url = "+data.urls.train='pipe:curl -s https://u:pw123456@h/train-{0..3}.tar?sig=abc'"
    with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base="1.3"):
        cfg = compose("train", overrides=[url, "+note=${oc.env:NO_SUCH_TOKEN_VAR}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "job")
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
        cfg.hydra.mode = RunMode.MULTIRUN
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "multirun.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"o": [url]})))
    ScrubbedHydraOutput(".hydra").on_job_start(cfg)  # an unset ${oc.env:} is written as the reference it is
    files = [*(tmp_path / "job" / ".hydra").glob("*.yaml"), tmp_path / "sweep" / "multirun.yaml"]
    assert sorted(p.name for p in files) == ["config.yaml", "hydra.yaml", "multirun.yaml", "overrides.yaml"]
    for path in files:
        text = path.read_text()
        assert "pw123456" not in text and "sig=abc" not in text, path
    overrides = OmegaConf.load(tmp_path / "job" / ".hydra" / "overrides.yaml")
    assert OmegaConf.to_container(overrides) == ["+data.urls.train='pipe:curl -s https://u:***@h/train-{0..3}.tar?sig=***'",
                                                 "+note=${oc.env:NO_SUCH_TOKEN_VAR}"]  # fmt: skip
