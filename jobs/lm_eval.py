"""lm-evaluation-harness on a trained model: the platform's checkable tasks (built in, local data)
or your own task YAMLs, scored through the serving Engine, logged to MLflow.

    ray job submit --working-dir . -- python jobs/lm_eval.py --config jobs/configs/lm_eval_tiny.yaml \\
        [--set model=runs:/<run_id>/model --set 'tasks=[diffmoe_reverse]' --set include_path=my_tasks]

Needs the optional extra: pip install 'diffmoe[lm-eval]'. The model is a Hugging Face directory or
an MLflow URI (runs:/<id>/model, models:/<name>/<version>, models:/<name>@<alias>). Logs one MLflow
run (metrics lm_eval/<task>/<metric>, results and samples as artifacts) tagged with the evaluated
model; last line: DIFFMOE_RESULT {"ok", "run_id", metrics}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))  # run from a checkout

from diffmoe.harness.job import LmEvalConfig, LmEvalError, evaluate_with_lm_eval  # noqa: E402
from diffmoe.jobs import run_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job(
        LmEvalConfig,
        lambda cfg, _args: evaluate_with_lm_eval(cfg),
        description=__doc__,
        argv=argv,
        input_errors=(LmEvalError,),
    )


if __name__ == "__main__":
    sys.exit(main())
