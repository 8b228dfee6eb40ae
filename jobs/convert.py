"""AR -> diffusion conversion on Ray Train + DeepSpeed: continue a causal (AR) checkpoint's training
under a diffusion objective, as LLaDA2.0 was made from an autoregressive MoE model.

    ray job submit --working-dir . -- python jobs/convert.py --config jobs/configs/convert_tiny.yaml \\
        [--set model.init_from=artifacts/ar-twin --set model.convert_to=masked_diffusion]

model.init_from is a causal checkpoint (jobs/pretrain.py with model.overrides.causal: true).
convert_to: block_diffusion (default recipe) maps its weights into the LLaDA2 layout and trains
with the block-diffusion objective under train.objective.block_schedule (a warm-up ladder of block
sizes, a stable phase, a decay to the serving block size), then exports a LLaDA2 directory that the
serving stack loads unchanged. Pretraining or SFT data. Last line: DIFFMOE_RESULT {"ok", "run_id",
"step", "model_dir"}.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))  # run from a checkout

from diffmoe.train.cli import main as train_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return train_main("convert", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
