"""CAP (confidence-aware parallel training) on an AR -> block-diffusion conversion: tokens decoded
per forward at equal accuracy.

The AR twin (trained here, or ``cap.ar_model``: e.g. the one bench_ar_to_diffusion.py trained) is
converted twice by the platform's job with the same data, steps and block schedule: without CAP and
with ``train.objective.block.confidence_beta`` (diffmoe.bench.conversion). Both are decoded by the
serving Engine with threshold 0.9 in blocks of 8 on the same held-out prompts. Ratio: tokens per
forward with CAP / without, at the last checkpoint (LLaDA2.0-mini reports 2.55 -> 3.72, 1.46x);
target >= 1.2 with accuracy within 0.02 of the run without CAP. Writes docs/benchmarks/cap.json.

    .venv/bin/python benchmarks/bench_cap.py [--set cap.ar_model=artifacts/ar_to_diffusion/models/ar]
"""

from __future__ import annotations

import sys

from common import run_on_local_ray, write_result


def bench(cfg, command: str) -> dict:
    from diffmoe.bench.conversion import run_cap_benchmark

    result = run_cap_benchmark(cfg)
    plain, cap = result["curves"]["converted"][-1], result["curves"]["converted_cap"][-1]
    ratio = cap["tokens_per_step"] / plain["tokens_per_step"]
    write_result(
        "cap",
        command=command,
        baseline="the same conversion run without the CAP term",
        ratio=ratio,
        target="CAP raises tokens decoded per forward >= 1.2x at accuracy within 0.02",
        target_ratio=1.2,
        checks={"accuracy_within_0.02": cap["accuracy"] >= plain["accuracy"] - 0.02},
        details={
            "confidence_beta": cfg.cap.confidence_beta,
            "at_steps": plain["steps"],
            "without_cap": plain,
            "with_cap": cap,
            "curves": result["curves"],
            "ar_model": result["ar_model"],
            "seconds": result["seconds"],
            "decoding": "serving Engine, threshold 0.9, blocks of 8, temperature 0",
        },
    )
    return {"benchmark": "cap", "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    from diffmoe.bench.conversion import CapBenchConfig

    return run_on_local_ray(CapBenchConfig, bench, "bench_cap.py", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
