"""Masked-diffusion pretraining on Ray Train + DeepSpeed (expert parallel, elastic, MLflow-tracked).

    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_tiny.yaml \\
        [--set train.max_steps=200 --set scaling.num_workers=2 --set deepspeed.ep_size=2]

Reads the shards jobs/prepare_corpus.py wrote (data.path), logs to MLflow, writes a Hugging Face
directory to run.output_dir and prints the result line DIFFMOE_RESULT {"ok", "run_id", "step", "model_dir"}.
Re-submitting with the same run.name and run.storage_path resumes from the last checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))  # run from a checkout

from diffmoe.train.cli import main as train_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return train_main("pretrain", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
