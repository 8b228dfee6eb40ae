"""Every shipped YAML recipe validates against its typed config; overrides and errors behave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffmoe.bench import CompareConfig
from diffmoe.config import ConfigError, apply_overrides, load
from diffmoe.data.config import CorpusConfig
from diffmoe.evaluate import EvalConfig
from diffmoe.harness.job import LmEvalConfig
from diffmoe.train.config import HOST_MALLOC_ENV, TrainJobConfig, effective_ep_size

JOBS = Path(__file__).resolve().parent.parent / "jobs"
CONFIGS = JOBS / "configs"
KINDS = {
    "corpus": CorpusConfig,
    "sft": CorpusConfig,
    "pretrain": TrainJobConfig,
    "finetune": TrainJobConfig,
    "convert": TrainJobConfig,
    "evaluate": EvalConfig,
    "lm_eval": LmEvalConfig,
    "benchmark": CompareConfig,
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_config_validates(path):
    kind = next((cls for prefix, cls in KINDS.items() if path.name.startswith(prefix)), None)
    assert kind is not None, f"{path.name}: no config model for this file name"
    load(kind, path)


@pytest.mark.parametrize("job", sorted(JOBS.glob("*.py")), ids=lambda p: p.name)
def test_every_job_has_help(job):
    out = subprocess.run([sys.executable, str(job), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "--set" in out.stdout


def test_overrides_are_typed_and_nested():
    cfg = load(
        TrainJobConfig, CONFIGS / "pretrain_tiny.yaml", ["optim.lr=1e-4", "scaling.num_workers=[1, 4]"]
    )
    assert cfg.optim.lr == 1e-4 and cfg.scaling.num_workers == (1, 4)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_an_override_changes_only_its_key_of_a_section_declared_with_its_own_defaults():
    """CapBenchConfig declares its task and output sections with values of their own: overriding
    one key keeps the others (pydantic alone would rebuild the section from the class defaults)."""
    from diffmoe.bench.conversion import CapBenchConfig

    default = CapBenchConfig()
    cfg = load(CapBenchConfig, overrides=["task.min_digits=9", "output.name=cap_seed1", "train.seed=1"])
    assert cfg.task.min_digits == 9 and cfg.train.seed == 1
    assert cfg.task.name == default.task.name
    # the section's class defaults are 12 and 48: rebuilt from the class, the override would lose these
    assert (
        (cfg.task.max_digits, cfg.task.seq_len) == (default.task.max_digits, default.task.seq_len) == (24, 64)
    )
    assert cfg.output.name == "cap_seed1" and cfg.output.work_dir == default.output.work_dir
    assert cfg.conversion.serving_block_length == default.conversion.serving_block_length
    assert load(CapBenchConfig, overrides=["task.name=reverse"]).task.name == "reverse"


def test_worker_env_defaults_to_malloc_settings_and_is_replaced_when_set():
    assert TrainJobConfig().scaling.worker_env == HOST_MALLOC_ENV
    cfg = load(TrainJobConfig, None, ["scaling.worker_env={MALLOC_ARENA_MAX: 2, FOO: bar}"])
    assert cfg.scaling.worker_env == {"MALLOC_ARENA_MAX": "2", "FOO": "bar"}  # numbers become strings
    with pytest.raises(ConfigError, match="scaling.worker_env"):
        load(TrainJobConfig, None, ["scaling.worker_env.FOO=[1, 2]"])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="optim.lr"):
        load(TrainJobConfig, None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="train.bogus"):
        load(TrainJobConfig, None, ["train.bogus=1"])
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load(TrainJobConfig, None, ["optim.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load(TrainJobConfig, "no/such.yaml")
    with pytest.raises(ConfigError, match="train.check.every needs deepspeed.ep_size 1"):
        load(TrainJobConfig, None, ["train.check.every=10", "deepspeed.ep_size=2", "scaling.num_workers=2"])


def test_elastic_ep_size_picks_a_divisor_of_world_and_experts():
    assert effective_ep_size(8, 16, 64) == 8
    assert effective_ep_size(8, 12, 64) == 4
    assert effective_ep_size(2, 3, 8) == 1
