"""AR -> block-diffusion conversion through jobs/convert.py's runner on a real Ray Train + DeepSpeed run:
a causal LLaDA-MoE checkpoint becomes a LLaDA2 model, trained expert-parallel (EP=2, shared experts
replicated) under a block-size schedule with aux-loss-free balancing, then resumed on one worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from diffmoe.config import build
from diffmoe.data.manifest import verify_dataset
from diffmoe.generation import generate
from diffmoe.model import LLaDA2MoeModelLM, LLaDAMoEModelLM, named_config
from diffmoe.train.config import TrainJobConfig
from diffmoe.train.trainer import TrainConfigError, preflight, run_training


@pytest.fixture(scope="module")
def ar_twin(tiny_corpus, tmp_path_factory) -> Path:
    """A causal checkpoint with the corpus's tokenizer ids and a shared expert (LLaDA2 keeps it)."""
    tok = verify_dataset(tiny_corpus).tokenizer
    torch.manual_seed(0)
    config = named_config(
        "tiny",
        vocab_size=tok.vocab_size,
        mask_token_id=tok.mask_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        shared_expert_intermediate_size=32,
        causal=True,
    )
    out = tmp_path_factory.mktemp("ar") / "ar-twin"
    LLaDAMoEModelLM(config).save_pretrained(out)
    return out


def _config(tmp: Path, data: Path, source: Path, workers: int = 2, **train) -> TrainJobConfig:
    return build(
        TrainJobConfig,
        {
            "model": {"init_from": str(source), "convert_to": "block_diffusion"},
            "data": {"path": str(data)},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {
                "max_steps": 8,
                "micro_batch_size": 4,
                "log_every": 1,
                "val_every": 8,
                "checkpoint_every": 8,
                "objective": {
                    "block_schedule": [[4, 1], [4, 16]],
                    "balance": "expert_bias",
                    "bias_update_rate": 0.01,
                    "block": {"confidence_beta": 0.5},
                },
                **train,
            },
            "deepspeed": {"ep_size": workers},
            "scaling": {"num_workers": workers, "cpus_per_worker": 0.5},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "tests"},
            "run": {"name": "convert", "storage_path": str(tmp / "runs"), "output_dir": str(tmp / "hf")},
        },
    )


def test_conversion_trains_llada2_expert_parallel_and_resumes_on_one_worker(
    ray_cluster, tiny_corpus, ar_twin, tmp_path
):
    cfg = _config(tmp_path, tiny_corpus, ar_twin)
    result = run_training(cfg)
    assert result.final_step == 8
    exported = json.loads((Path(result.model_dir) / "config.json").read_text())
    assert exported["model_type"] == "llada2_moe" and exported["block_length"] == 16
    model = LLaDA2MoeModelLM.from_pretrained(result.model_dir).eval()
    assert model.config.num_shared_experts == 1 and model.config.first_k_dense_replace == 0

    # the training-time forward (DeepSpeed EP=2, shared experts beside it) is the exported model's
    probe = load_file(os.path.join(result.model_dir, "training_probe_logits.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(probe["input_ids"]).logits, probe["logits"], atol=1e-5, rtol=1e-5)
    # aux-loss-free balancing moved every MoE layer's selection bias, no aux loss was trained
    biases = [layer.mlp.gate.expert_bias for layer in model.model.layers]
    assert all(float(b.abs().sum()) > 0 for b in biases)

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(result.run_id)
    assert "train/aux_loss" not in run.data.metrics
    for key in ("train/confidence", "train/masked_ce", "val/loss", "moe/layer1/max_mean_load"):
        assert key in run.data.metrics, key
    lengths = sorted(
        (m.step, m.value) for m in client.get_metric_history(result.run_id, "train/block_length")
    )
    assert [v for _, v in lengths] == [1] * 4 + [16] * 4

    # the exported directory decodes through the block-diffusion sampler
    prompt = torch.tensor([[5, 6, 7, 8]])
    out = generate(model, prompt, gen_length=16, block_length=16, steps=4, mask_id=model.config.mask_token_id)
    assert out.shape == (1, 20) and bool((out[:, 4:] != model.config.mask_token_id).all())

    # same run on one worker: resumes from the gathered weights (2 -> 1 workers, EP 2 -> 1)
    resumed = run_training(
        _config(
            tmp_path,
            tiny_corpus,
            ar_twin,
            workers=1,
            max_steps=10,
            objective={"block_schedule": [[4, 1], [6, 16]], "balance": "expert_bias"},
        )
    )
    assert resumed.metrics["resumed_from_step"] == 8 and resumed.final_step == 10
    run = client.get_run(resumed.run_id)
    assert "'how': 'weights'" in run.data.tags["restored.last"]


def test_conversion_refuses_what_it_cannot_convert(tiny_corpus, ar_twin, tmp_path):
    bidirectional = tmp_path / "mdlm"
    config = json.loads((ar_twin / "config.json").read_text())
    LLaDAMoEModelLM.from_pretrained(ar_twin).save_pretrained(bidirectional)
    (bidirectional / "config.json").write_text(json.dumps({**config, "causal": False}))
    with pytest.raises(TrainConfigError, match="converts a causal"):
        preflight(_config(tmp_path, tiny_corpus, bidirectional))
    with pytest.raises(TrainConfigError, match="does not divide the data's seq_len 64"):
        preflight(_config(tmp_path, tiny_corpus, ar_twin, objective={"block_schedule": [[4, 1], [4, 24]]}))
    with pytest.raises(ValueError, match="add up to 9 steps but train.max_steps=8"):
        _config(tmp_path, tiny_corpus, ar_twin, objective={"block_schedule": [[5, 1], [4, 16]]})
