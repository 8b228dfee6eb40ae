"""Evaluate a trained model: loss per token on a dataset split (the diffusion bound, or the AR twin's
exact NLL) and, on SFT data, Engine answers scored against the held-out references.

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate_tiny.yaml \\
        [--set model=runs:/<run_id>/model --set data.path=$PWD/data/sft_tiny --set num_gpus=1]

The model is a Hugging Face directory or an MLflow URI (runs:/<id>/model, models:/<name>/<version>).
Logs an MLflow run tagged with the evaluated model; last line: DIFFMOE_RESULT {"ok", "run_id", metrics}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))  # run from a checkout

from diffmoe.evaluate import EvalConfig, EvalError, evaluate  # noqa: E402
from diffmoe.jobs import run_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job(
        EvalConfig,
        lambda cfg, _args: evaluate(cfg),
        description=__doc__,
        argv=argv,
        input_errors=(EvalError,),
    )


if __name__ == "__main__":
    sys.exit(main())
