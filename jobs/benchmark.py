"""Diffusion MoE vs its autoregressive twin: same backbone, data, token budget and server, side by side.

    ray job submit --working-dir . -- python jobs/benchmark.py --config jobs/configs/benchmark_dllm_vs_ar.yaml \\
        [--set train.steps=300 --set load.concurrency=[1,4,16]]

Prepares the task data through the data pipeline, trains both twins with the training job, measures
validation loss per token (diffusion: upper bound on NLL; AR: exact NLL) and task accuracy, serves
both with Ray Serve and sweeps the load generator over the concurrency levels. Logs both sides as
MLflow runs in one experiment, writes output.report_dir/<name>.json, .md and PNG plots, and prints
a JSON line with the headline.
"""

import argparse
import json
import shlex
import sys

from diffmoe.config import ConfigError, add_config_args, load


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser, default="jobs/configs/benchmark_dllm_vs_ar.yaml")
    args = parser.parse_args(argv)
    from diffmoe.bench import CompareConfig, run_comparison

    try:
        cfg = load(CompareConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = "python jobs/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = run_comparison(cfg, command=command.strip())
    print(
        json.dumps(
            {
                "headline": result["headline"],
                "mlflow_run_ids": result["mlflow_run_ids"],
                "files": result["files"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
