"""Diffusion MoE vs its autoregressive twin: same backbone, data, token budget and server, side by side.

    ray job submit --working-dir . -- python jobs/benchmark.py --config jobs/configs/benchmark_dllm_vs_ar.yaml \\
        [--set train.steps=300 --set load.concurrency=[1,4,16]]

Prepares the task data through the data pipeline, trains both twins with the training job, measures
validation loss per token (diffusion: upper bound on NLL; AR: exact NLL) and task accuracy, serves
both with Ray Serve and sweeps the load generator over the concurrency levels. Logs both sides as
MLflow runs in one experiment, writes output.report_dir/<name>.json, .md and PNG plots, and prints
the result line DIFFMOE_RESULT {"ok", "headline", "mlflow_run_ids", "files"}.
"""

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))  # run from a checkout

from diffmoe.bench import CompareConfig  # noqa: E402
from diffmoe.jobs import run_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    command = "python jobs/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    def compare(cfg: CompareConfig, _args) -> dict:
        from diffmoe.bench import run_comparison

        result = run_comparison(cfg, command=command.strip())
        return {k: result[k] for k in ("headline", "mlflow_run_ids", "files")}

    return run_job(
        CompareConfig,
        compare,
        description=__doc__,
        argv=argv,
        default_config="jobs/configs/benchmark_dllm_vs_ar.yaml",
    )


if __name__ == "__main__":
    sys.exit(main())
