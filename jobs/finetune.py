"""Supervised fine-tuning (response-only diffusion loss) on Ray Train + DeepSpeed.

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune_tiny.yaml \\
        [--set model.init_from=path/to/hf_dir --set data.path=data/sft]

model.init_from is a Hugging Face directory: one written by jobs/pretrain.py or a real LLaDA-MoE
download. data.path is an SFT dataset from jobs/prepare_corpus.py (kind: sft) made with the same
tokenizer. Last line: DIFFMOE_RESULT {"ok", "run_id", "step", "model_dir"}.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))  # run from a checkout

from diffmoe.train.cli import main as train_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return train_main("sft", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
