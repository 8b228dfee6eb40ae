"""The diffusion-vs-AR comparison end to end at the smallest settings, on a real local Ray cluster:
data pipeline, both twins trained by the training job (Ray Train + DeepSpeed), quality, both served
by Ray Serve on loopback under the load generator, MLflow runs, report files. No figure is asserted,
only that both sides produce every metric."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from diffmoe.bench import CompareConfig
from diffmoe.bench.quality import train_config
from diffmoe.config import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent
LEVELS = [1, 2]


def tiny_settings(tmp_path: Path) -> list[str]:
    return [
        # Fixed-length answers in tight rows: after a few dozen steps both twins emit digits rather
        # than only end markers, so every metric (time to first token included) is defined.
        "task.min_digits=6",
        "task.max_digits=6",
        "task.train_examples=400",
        "task.validation_fraction=0.1",
        "task.seq_len=24",
        "task.eval_examples=8",
        "train.steps=60",
        "block.steps=20",
        "block.ladder=[[5, 1]]",
        "train.micro_batch_size=8",
        "train.warmup_steps=1",
        "train.val_batches=1",
        "train.check_every=30",  # two checks per twin inside its run (30 and the budget, 60)
        "train.check_prompts=4",
        "decoding.val_draws=1",
        f"load.concurrency={LEVELS}",
        "load.poisson_rates=[4.0]",
        "decoding.threshold_sweep=[0.5, 0.9]",
        "load.poisson_duration_s=1.0",
        "load.requests_per_client=1",
        "load.min_requests=2",
        "load.prompts=4",
        "load.warmup_requests=1",
        "load.replica_cpus=1",
        "load.max_batch_size=4",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "mlflow.experiment=dllm-vs-ar-test",
        f"output.work_dir={tmp_path}/work",
        f"output.report_dir={tmp_path}/report",
    ]


def test_config_and_job_help():
    cfg = load(CompareConfig, ROOT / "jobs/configs/benchmark_dllm_vs_ar.yaml")
    assert cfg == CompareConfig()  # the YAML states the defaults
    dllm, ar = (train_config(cfg, side, Path("data")) for side in ("dllm", "ar"))
    assert "causal" not in dllm.model.overrides and ar.model.overrides["causal"] is True
    same = {k: v for k, v in dllm.model_dump().items() if k not in ("model", "mlflow", "run")}
    assert same == {k: v for k, v in ar.model_dump().items() if k not in ("model", "mlflow", "run")}
    with pytest.raises(ConfigError, match="load.concurrency"):
        load(CompareConfig, None, ["load.concurrency=3"])
    # The block side converts the trained AR twin under the ladder, ending at the serving block.
    block = train_config(cfg, "block", Path("data"), init_from="models/ar")
    assert block.model.init_from == "models/ar" and block.model.convert_to == "block_diffusion"
    assert block.train.max_steps == cfg.block.steps and block.optim.lr == cfg.block.lr
    assert block.train.objective.block_schedule == [(25, 1), (25, 4), (cfg.block.steps - 50, 8)]
    with pytest.raises(ConfigError, match="block.block_length"):
        load(CompareConfig, None, ["block.block_length=7"])
    with pytest.raises(ValueError, match="trained AR twin"):
        train_config(cfg, "block", Path("data"))
    # Train until the target: each run checks itself on the check prompts (their own seed) and ends
    # at the target; the block side decodes its checks in its serving blocks.
    c = dllm.train.check
    assert (c.every, c.prompts, c.seed, c.target) == (
        250,
        128,
        cfg.task.eval_seed + 1,
        cfg.task.target_accuracy,
    )
    assert dllm.train.max_steps == cfg.train.steps and c.block_length is None
    assert block.train.check.block_length == cfg.block.block_length
    off = load(CompareConfig, None, ["train.check_every=0"])
    assert train_config(off, "ar", Path("data")).train.check.every == 0
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs/benchmark.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--set" in out.stdout


def test_whole_comparison_smallest_settings(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from diffmoe.bench import run_comparison
    from diffmoe.model.checkpoint import load_config

    cfg = load(CompareConfig, ROOT / "jobs/configs/benchmark_dllm_vs_ar.yaml", tiny_settings(tmp_path))
    result = run_comparison(cfg, command="pytest tests/test_dllm_vs_ar.py")

    # The AR twin is the same backbone with causal: true, and that reached the exported model; the
    # block side is that twin converted to the LLaDA2 layout and trained on for its own steps.
    assert list(result["sides"]) == ["dllm", "ar", "block"]
    dirs = {s: result["sides"][s]["train"]["model_dir"] for s in result["sides"]}
    assert load_config(Path(dirs["ar"])).causal is True
    assert load_config(Path(dirs["dllm"])).causal is False
    assert load_config(Path(dirs["block"])).model_type == "llada2_moe"
    block = result["sides"]["block"]
    assert block["train"]["converted_from"] == dirs["ar"] and block["train"]["steps"] == 20
    assert block["train"]["tokens"] * 3 == result["sides"]["ar"]["train"]["tokens"]  # 20 vs 60 steps
    # No side reaches the target in 60 (20) steps: each trained its whole budget, checked on the way.
    for side, steps in (("dllm", [30, 60]), ("ar", [30, 60]), ("block", [20])):
        t = result["sides"][side]["train"]
        assert [c["steps"] for c in t["checks"]] == steps and t["reached_target_at_step"] is None
        assert all(0 <= c["accuracy"] < 0.97 for c in t["checks"]) and t["machine_cpu_seconds"] > 0
        assert 0 < t["step_seconds"] < t["train_seconds"]
    cost = result["headline"]["cost_to_target"]
    assert cost["block"]["tokens"] == block["train"]["tokens"] + result["sides"]["ar"]["train"]["tokens"]
    assert block["quality"]["block_length"] == 8 and "block diffusion" in block["objective"]
    for side in ("dllm", "ar"):
        s = result["sides"][side]
        assert (
            s["train"]["steps"] == 60 and s["train"]["tokens"] == result["sides"]["dllm"]["train"]["tokens"]
        )
    for side in result["sides"]:
        s = result["sides"][side]
        q = s["quality"]
        assert math.isfinite(q["val_loss_per_token"]) and q["val_loss_per_token"] > 0
        assert q["val_tokens"] == result["sides"]["dllm"]["quality"]["val_tokens"]  # same scored tokens
        assert 0 <= q["accuracy"] <= 1 and q["total"] == 8
        assert [lv["concurrency"] for lv in s["load"]] == LEVELS
        for lv in s["load"]:
            assert lv["errors"] == 0 and lv["requests"] >= 2
            assert lv["output_tokens_per_s"] > 0 and lv["requests_per_s"] > 0
            assert {"p50", "p99"} <= lv["latency_s"].keys() and {"p50", "p99"} <= lv["ttft_s"].keys()
            assert lv["replica_found"] and lv["replica_cpu_s_per_1k_tokens"] > 0
            assert lv["machine_cpu_s_per_1k_tokens"] > 0
    assert "upper bound" in result["sides"]["dllm"]["quality"]["val_loss_kind"]
    assert "exact" in result["sides"]["ar"]["quality"]["val_loss_kind"]
    # Threshold sweep (each diffusion side): both points measured, the served one among them.
    for side in ("dllm", "block"):
        q = result["sides"][side]["quality"]
        assert [x["threshold"] for x in q["threshold_sweep"]] == [0.5, 0.9]
        best = max(x["accuracy"] for x in q["threshold_sweep"])
        chosen = next(x for x in q["threshold_sweep"] if x["threshold"] == q["threshold"])
        assert chosen["accuracy"] >= best - 0.01 and q["accuracy"] == chosen["accuracy"]
    # Open loop: one Poisson rate, served and scored the same way.
    for side in result["sides"]:
        (lv,) = result["sides"][side]["open_loop"]
        assert lv["offered_rps"] == 4.0 and lv["requests"] >= 1 and lv["errors"] == 0
        assert lv["replica_found"] and 0 <= lv["correct"] <= lv["requests"]
    # Answers served under load are scored against the right ones (each side stops at its end marker).
    for side in result["sides"]:
        for lv in result["sides"][side]["load"]:
            assert 0 <= lv["correct"] <= lv["requests"] and 0 <= lv["served_accuracy"] <= 1
    # 60 steps do not reach the quality gate: the report compares nothing rather than unequal models.
    h = result["headline"]
    assert h["below_target"] and h["ratio"] is None and not h["quality_matched"]

    # Report files.
    report = tmp_path / "report"
    body = json.loads((report / "dllm_vs_ar.json").read_text())
    assert {
        "benchmark",
        "machine",
        "command",
        "baseline",
        "ratio",
        "target",
        "target_ratio",
        "met",
        "details",
    } <= body.keys()
    assert body["met"] is False and body["ratio"] == 0.0
    assert body["checks"]["ar_and_a_diffusion_side_reached_target_accuracy"] is False
    assert body["command"] == "pytest tests/test_dllm_vs_ar.py"
    md = (report / "dllm_vs_ar.md").read_text()
    assert "## Machine" in md and "pytest tests/test_dllm_vs_ar.py" in md and "| ar | 2 |" in md
    assert "**Not compared**" in md and "## Open loop (Poisson arrivals)" in md and "| ar | 4 |" in md
    assert "| block | 2 |" in md and "Block diffusion (`block`)" in md
    assert "## Diffusion decoding: threshold sweep" in md
    assert "## Cost to reach quality" in md and "| dllm | 60 | not reached |" in md
    for png in body["details"]["plots"]:
        assert (report / png).read_bytes()[:4] == b"\x89PNG"

    # MLflow: both sides' benchmark runs (and their training runs) in one experiment.
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("dllm-vs-ar-test")
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {
        "benchmark-dllm",
        "benchmark-ar",
        "benchmark-block",
        "train-dllm",
        "train-ar",
        "train-block",
    } <= names
    for side, steps in (("dllm", [30, 60]), ("ar", [30, 60]), ("block", [20])):  # the runs' own checks
        hist = client.get_metric_history(result["sides"][side]["train"]["run_id"], "check/accuracy")
        assert sorted(m.step for m in hist) == steps
    for side, rid in result["mlflow_run_ids"].items():
        run = client.get_run(rid)
        assert run.data.params["side"] == side
        assert "quality/val_loss_per_token" in run.data.metrics and "quality/accuracy" in run.data.metrics
        hist = client.get_metric_history(rid, "load/output_tokens_per_s")
        assert sorted(m.step for m in hist) == LEVELS

    # A rerun over the same work directory with another task rebuilds the data (it never errors).
    from diffmoe.bench.quality import prepare_data
    from diffmoe.data import verify_dataset

    before = verify_dataset(tmp_path / "work/data/sft").fingerprint
    other = load(CompareConfig, None, [*tiny_settings(tmp_path), "task.name=reverse"])
    again = prepare_data(other, log=lambda *a: None)
    assert verify_dataset(again.data_dir).fingerprint != before and again.train_rows > 0


def test_served_threshold_is_the_fastest_within_a_point_of_the_best():
    from diffmoe.bench.dllm_vs_ar import choose_threshold

    sweep = [
        {"threshold": 0.5, "accuracy": 0.90, "forwards_per_token": 0.2},  # fastest, 10 points worse
        {"threshold": 0.7, "accuracy": 0.992, "forwards_per_token": 0.3},  # within a point: served
        {"threshold": 0.9, "accuracy": 1.0, "forwards_per_token": 0.5},
        {"threshold": 0.95, "accuracy": 1.0, "forwards_per_token": 0.5},
    ]
    assert choose_threshold(sweep)["threshold"] == 0.7
    assert choose_threshold(sweep[2:])["threshold"] == 0.95  # equal speed: the safer threshold


def test_cap_is_compared_at_equal_accuracy_each_model_at_its_fastest_threshold():
    from diffmoe.bench.conversion import at_matched_accuracy

    def pts(*rows):
        return [{"threshold": t, "accuracy": a, "tokens_per_step": s} for t, a, s in rows]

    plain = pts((0.5, 0.80, 4.0), (0.7, 0.89, 3.0), (0.9, 0.90, 2.0))
    cap = pts((0.5, 0.86, 5.0), (0.7, 0.95, 3.3), (0.9, 0.96, 2.5))
    m = at_matched_accuracy(plain, cap, served=0.9, tolerance=0.02)  # level 0.88
    assert m["without_cap"]["threshold"] == 0.7 and m["with_cap"]["threshold"] == 0.7
    assert m["ratio"] == pytest.approx(3.3 / 3.0)  # not 5.0 / 2.0: the 0.5 CAP point is below the level
    worse = pts((0.5, 0.50, 6.0), (0.7, 0.80, 4.0), (0.9, 0.85, 3.0))
    assert at_matched_accuracy(plain, worse, served=0.9, tolerance=0.02)["ratio"] is None


def test_data_constrained_epochs_steps_and_crossing():
    from diffmoe.bench.data_constrained import DataConstrainedConfig, crossing_epoch, steps_for, summarise

    assert steps_for(1, 1350, 32) == 43 and steps_for(64, 1350, 32) == 2700  # last step may spill over
    with pytest.raises(ValueError, match="increasing epoch counts"):
        DataConstrainedConfig.model_validate({"data_constrained": {"epochs": [4, 2]}})
    with pytest.raises(ValueError, match="increasing epoch counts"):
        DataConstrainedConfig.model_validate({"data_constrained": {"epochs": [0, 1]}})

    def curve(losses, accs):
        return [
            {"epochs": e, "val_loss_per_token": v, "accuracy": a}
            for e, v, a in zip([1, 2, 4, 8], losses, accs, strict=True)
        ]

    ar = curve([1.0, 0.6, 0.7, 0.9], [0.1, 0.5, 0.4, 0.3])  # overfits after 2 epochs
    dllm = curve([1.4, 0.9, 0.65, 0.5], [0.0, 0.2, 0.5, 0.6])
    assert crossing_epoch(dllm, ar) == 4
    assert crossing_epoch(dllm[:2], ar[:2]) is None  # not within the budget
    early = curve([0.9, 0.9, 0.65, 0.5], [0, 0, 0, 0])  # below at 1 epoch (untrained), above at 2
    assert crossing_epoch(early, ar) == 4  # the crossing is where it stays below
    s = summarise({"dllm": dllm, "ar": ar})
    assert s["loss_crossing_epoch"] == 4
    assert s["best_val_loss"]["ar"] == {"epochs": 2, "val_loss_per_token": 0.6}
    assert s["best_accuracy"]["dllm"] == {"epochs": 8, "accuracy": 0.6}
    assert s["final"]["ar"] == {"epochs": 8, "val_loss_per_token": 0.9, "accuracy": 0.3}
    text = {side: [{**x, "accuracy": None} for x in c] for side, c in (("dllm", dllm), ("ar", ar))}
    assert summarise(text)["best_accuracy"] == {"dllm": None, "ar": None}  # a text corpus has no task
    with pytest.raises(ValueError, match="corpus"):
        DataConstrainedConfig.model_validate({"data_constrained": {"corpus": "novels"}})


def test_load_refuses_more_replica_cpus_than_the_cluster_has(monkeypatch):
    """Serve would wait forever for a replica that cannot be placed: fail first, naming the setting."""
    import ray

    from diffmoe.bench.load import run_load

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    cfg = CompareConfig()  # replica_cpus 2 x three sides
    with pytest.raises(ValueError, match=r"load.replica_cpus=2.0 x 3 sides needs 6 CPUs .* has 4"):
        run_load(cfg, {"dllm": "d", "ar": "a", "block": "b"})
