"""Command line shared by jobs/pretrain.py and jobs/finetune.py (``--config``, ``--set``)."""

from __future__ import annotations

import argparse
import json
import sys

from diffmoe.config import ConfigError, add_config_args, load

from .config import TrainJobConfig


def main(kind: str, description: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load(TrainJobConfig, args.config, args.overrides)
        if cfg.train.kind != kind:
            raise ConfigError(f"train.kind is {cfg.train.kind!r}; this job runs {kind!r}")
        from .trainer import TrainConfigError, run_training

        result = run_training(cfg)
    except (ConfigError, TrainConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"run_id": result.run_id, "step": result.final_step, "model_dir": result.model_dir}))
    return 0
