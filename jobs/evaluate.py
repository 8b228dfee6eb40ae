"""Evaluate a trained model: loss per token on a dataset split (the diffusion bound, or the AR twin's
exact NLL) and, on SFT data, Engine answers scored against the held-out references.

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate_tiny.yaml \\
        [--set model=runs:/<run_id>/model --set data.path=$PWD/data/sft_tiny --set num_gpus=1]

The model is a Hugging Face directory or an MLflow URI (runs:/<id>/model, models:/<name>/<version>).
Logs an MLflow run tagged with the evaluated model and prints a JSON line with its metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))  # run from a checkout

from diffmoe.config import ConfigError, add_config_args, load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    args = parser.parse_args(argv)
    from diffmoe.evaluate import EvalConfig, EvalError, evaluate

    try:
        cfg = load(EvalConfig, args.config, args.overrides)
        result = evaluate(cfg)
    except (ConfigError, EvalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
