"""What jobs/pretrain.py and jobs/finetune.py run: the shared job runner around ``run_training``."""

from __future__ import annotations

from diffmoe.config import ConfigError
from diffmoe.jobs import run_job

from .config import TrainJobConfig
from .trainer import TrainConfigError, run_training


def main(kind: str, description: str, argv: list[str] | None = None) -> int:
    """``kind``: "pretrain" or "sft" (train.kind must match), or "convert" (model.convert_to must be
    set; pretraining or SFT data)."""

    def check(cfg: TrainJobConfig) -> None:
        if kind == "convert":
            if not cfg.model.convert_to:
                raise ConfigError("model.convert_to is not set: this job converts a causal (AR) checkpoint")
        elif cfg.train.kind != kind:
            raise ConfigError(f"train.kind is {cfg.train.kind!r}; this job runs {kind!r}")

    def train(cfg: TrainJobConfig, _args) -> dict:
        result = run_training(cfg)
        out = {"run_id": result.run_id, "step": result.final_step, "model_dir": result.model_dir}
        if result.registered:
            out["registered"] = result.registered
        return out

    return run_job(
        TrainJobConfig,
        train,
        description=description,
        argv=argv,
        check=check,
        input_errors=(TrainConfigError,),
    )
