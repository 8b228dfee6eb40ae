"""Supervised fine-tuning (response-only diffusion loss) on Ray Train + DeepSpeed.

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune_tiny.yaml \\
        [--set model.init_from=path/to/hf_dir --set data.path=data/sft]

model.init_from is a Hugging Face directory: one written by jobs/pretrain.py or a real LLaDA-MoE
download. data.path is an SFT dataset from jobs/prepare_corpus.py (kind: sft) made with the same
tokenizer. Prints a JSON line: {"run_id", "step", "model_dir"}.
"""

import sys

from diffmoe.train.cli import main

if __name__ == "__main__":
    sys.exit(main("sft", __doc__))
