"""Masked-diffusion pretraining on Ray Train + DeepSpeed.

    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_tiny.yaml \\
        [--set train.max_steps=200 --set scaling.num_workers=2 --set deepspeed.ep_size=2]

Reads the shards jobs/prepare_corpus.py wrote (data.path), logs to MLflow, writes a Hugging Face
directory to run.output_dir and prints a JSON summary line (run id, step, model dir).
"""

from __future__ import annotations

import argparse
import json
import sys

from diffmoe.config import ConfigError, add_config_args, load
from diffmoe.train.config import TrainJobConfig


def main(argv: list[str] | None = None, kind: str = "pretrain") -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load(TrainJobConfig, args.config, args.overrides)
        if cfg.train.kind != kind:
            raise ConfigError(f"train.kind is {cfg.train.kind!r}; this job runs {kind!r}")
        from diffmoe.train.trainer import TrainConfigError, run_training

        result = run_training(cfg)
    except (ConfigError, TrainConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"run_id": result.run_id, "step": result.final_step, "model_dir": result.model_dir}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
