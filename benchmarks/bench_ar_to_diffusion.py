"""AR -> block-diffusion conversion against diffusion from scratch: accuracy vs training tokens.

Four sides, same task (lookup: 3-6 two-digit keys -> their values in a fixed secret table of 100, chat
SFT rows of 48 tokens; ``--set task.name=sort`` sorts 4-12 digits instead), backbone, batch and training
job (diffmoe.bench.conversion): (a) the AR twin, (b) a block-diffusion model converted from (a)'s
final weights, (c) masked diffusion from scratch, (d) block diffusion from scratch (same job as (b)
from (a)'s untrained weights). Target (issue 18): (b) reaches >= 0.95 of (a)'s final accuracy using
<= 25% of the tokens (d) needs to get there, i.e. ratio = tokens(d) / tokens(b) at that accuracy >= 4.
Writes docs/benchmarks/<output.name>.json and .png (ar_to_diffusion by default).

    .venv/bin/python benchmarks/bench_ar_to_diffusion.py [--set conversion.convert_checkpoints=[0,100] ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import ROOT, run_on_local_ray, write_result

BASELINE = "block diffusion from scratch (same backbone, data, batch and job)"


def plot(curves: dict, level: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "ar": "(a) AR twin",
        "converted": "(b) converted from (a) [conversion tokens]",
        "mdlm": "(c) masked diffusion, scratch",
        "block_scratch": "(d) block diffusion, scratch",
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    for side, curve in curves.items():
        xs = [p["tokens"] / 1e6 for p in curve]
        ax.plot(xs, [p["accuracy"] for p in curve], marker="o", markersize=3, label=labels[side])
    ax.axhline(level, color="grey", linestyle=":", label=f"target {level:.3f}")
    ax.set_xlabel("training tokens (millions; the converted side's own)")
    ax.set_ylabel("exact match, held-out prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(result: dict, share: float) -> tuple[float, dict, dict]:
    from diffmoe.bench.conversion import first_crossing

    curves = result["curves"]
    ar_final = curves["ar"][-1]["accuracy"]
    level = share * ar_final
    converted = first_crossing(curves["converted"], level)
    scratch = first_crossing(curves["block_scratch"], level)
    lower_bound = scratch is None  # (d) never got there: its last budget bounds the ratio from below
    scratch_tokens = curves["block_scratch"][-1]["tokens"] if lower_bound else scratch["tokens"]
    step_tokens = result["tokens_per_step"]
    if converted is None or ar_final == 0:
        ratio = 0.0  # nothing to compare: the AR twin learned nothing, or conversion never got there
    else:  # reached at 0 conversion steps: count one step, so the ratio stays finite
        ratio = scratch_tokens / max(converted["tokens"], step_tokens)
    crossings = {
        side: (lambda p: None if p is None else {"steps": p["steps"], "tokens": p["tokens"]})(
            first_crossing(curve, 0.9)
        )
        for side, curve in curves.items()
    }
    summary = {
        "target_level": round(level, 4),
        "ar_final_accuracy": ar_final,
        "converted_at_target": converted,
        "scratch_at_target": scratch,
        "ratio_is_lower_bound": lower_bound,
        "first_point_at_90pct": crossings,
    }
    checks = {
        "ar_twin_learned_the_task": ar_final > 0,
        "converted_reaches_target_share_of_ar": converted is not None,
    }
    return ratio, summary, checks


def prompts_seen_in_training(cfg) -> int:
    """How many of the scored held-out prompts also occur in the training examples."""
    from diffmoe.bench.quality import TRAIN_SEED, make_task
    from diffmoe.generation.tasks import make_examples

    task = make_task(cfg)
    train = {ex.prompt for ex in make_examples(task, cfg.task.train_examples, seed=TRAIN_SEED)}
    return sum(
        ex.prompt in train for ex in make_examples(task, cfg.task.eval_examples, seed=cfg.task.eval_seed)
    )


def bench(cfg, command: str) -> dict:
    from diffmoe.bench.conversion import run_conversion_benchmark

    result = run_conversion_benchmark(cfg)
    share = cfg.conversion.target_accuracy_share
    ratio, summary, checks = summarise(result, share)
    name = cfg.output.name  # "ar_to_diffusion" unless --set output.name=... (e.g. another seed)
    png = ROOT / "docs" / "benchmarks" / f"{name}.png"
    plot(result["curves"], summary["target_level"], png)
    write_result(
        name,
        command=command,
        baseline=BASELINE,
        ratio=ratio,
        target=(
            f"the converted model reaches {share:.2f} x the AR twin's accuracy using <= 25% of the "
            "tokens block diffusion from scratch needs (ratio = scratch tokens / conversion tokens)"
        ),
        target_ratio=4.0,
        checks=checks,
        details={
            **summary,
            "curves": result["curves"],
            "tokens_per_step": result["tokens_per_step"],
            "train_rows": result["train_rows"],
            "held_out_prompts_seen_in_training": prompts_seen_in_training(cfg),
            "seconds": result["seconds"],
            "settings": cfg.model_dump(
                mode="json", include={"task", "model", "train", "decoding", "conversion"}
            ),
            "notes": (
                "converted tokens count the conversion run only; the AR twin's own tokens are "
                "curve (a). Accuracy is exact match on task.eval_examples held-out prompts, "
                "decoded by the serving Engine at temperature 0."
            ),
            "plot": png.name,
        },
    )
    return {"benchmark": name, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    from diffmoe.bench.conversion import ConversionBenchConfig

    return run_on_local_ray(ConversionBenchConfig, bench, "bench_ar_to_diffusion.py", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
