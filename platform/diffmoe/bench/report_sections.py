"""Parts of the dLLM-vs-AR report: what each side cost to train to the target, the diffusion sides'
threshold sweeps (accuracy vs speed, offline) and the open loop (Poisson arrival rates against what
each side served).

A closed loop never offers more than its clients can wait for; users do not wait for each other, so
this sweep shows where each side saturates: achieved requests/s flattening below the offered rate,
latency (queueing) growing, and 429s once the replica's queue is full.
"""

from __future__ import annotations

from pathlib import Path

COLOR = {"dllm": "C0", "ar": "C1", "block": "C2"}


def _fmt(v, digits=3):
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def cost_to_target(result: dict, side: str) -> dict:
    """What training a side took to the target (its whole budget when it missed it); the block
    side's figures include the AR twin it was converted from."""
    t, ar = result["sides"][side]["train"], result["sides"]["ar"]["train"]
    parts = [t] if "converted_from" not in t else [t, ar]
    cpu = [x.get("machine_cpu_seconds") for x in parts]
    steps = [x.get("step_seconds") for x in parts]  # None: a run from before it was recorded
    return {
        "reached_at_step": t.get("reached_target_at_step"),
        "tokens": sum(x["tokens"] for x in parts),
        "train_seconds": round(sum(x["train_seconds"] for x in parts), 1),
        "step_seconds": None if None in steps else round(sum(steps), 1),
        "machine_cpu_seconds": None if None in cpu else round(sum(cpu), 1),
    }


def training_cost_table(result: dict) -> list[str]:
    """What each side cost to reach the target (or its whole budget when it did not)."""
    cfg = result["config"]
    every, target = cfg["train"].get("check_every", 0), cfg["task"]["target_accuracy"]
    how = (
        f"Each side trains until its exact match on {cfg['train']['check_prompts']} check prompts (a seed apart "
        f"from the reported ones) reaches {target}, checked every {every} steps, or until its budget. "
        if every
        else "Each side trains its whole budget (no checks: `train.check_every: 0`). "
    )
    rows = [
        "## Cost to reach quality",
        "",
        how + "Own tokens: the side's own run; the block side starts from the AR twin, so its totals add the "
        "AR side's. `train s` is the training job's wall time (Ray Train start-up, the checks, which run "
        "inside the job, and export included); `steps s` the optimizer steps alone; machine CPU-s is all "
        "busy CPU time on the machine during the job.",
        "",
        "| side | budget steps | reached target at step | own tokens | total tokens | total train s "
        "| of which steps s | total machine CPU-s | check accuracy by step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for side, x in result["sides"].items():
        t, cost = x["train"], cost_to_target(result, side)
        curve = ", ".join(f"{c['steps']}: {c['accuracy']:.3f}" for c in t.get("checks", [])) or "n/a"
        reached = cost["reached_at_step"]
        rows.append(
            f"| {side} | {t.get('budget_steps', t['steps'])} | {reached or 'not reached'} | {t['tokens']:,} "
            f"| {cost['tokens']:,} | {cost['train_seconds']} | {_fmt(cost['step_seconds'], 1)} "
            f"| {_fmt(cost['machine_cpu_seconds'], 1)} | {curve} |"
        )
    return [*rows, ""]


def open_loop_table(result: dict) -> list[str]:
    if not any(x.get("open_loop") for x in result["sides"].values()):
        return []
    rows = [
        "## Open loop (Poisson arrivals)",
        "",
        f"Requests arrive as a Poisson process at each rate for {result['config']['load']['poisson_duration_s']} s "
        "(seeded, the same arrival times for both sides), after the closed-loop levels; throughput is over the "
        "whole level including the drain. A side is saturated where served req/s falls below the offered rate and "
        "latency grows; `errors` are 429s from a full replica queue.",
        "",
        "| side | offered req/s | requests | served req/s | served acc. | correct/s | p50 s | p99 s | TTFT p50 s "
        "| peak in flight | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side in result["sides"]:
        for lv in result["sides"][side].get("open_loop", []):
            rows.append(
                f"| {side} | {lv['offered_rps']:g} | {lv['requests']} | {_fmt(lv['requests_per_s'], 2)} "
                f"| {_fmt(lv.get('served_accuracy'))} | {_fmt(lv.get('correct_answers_per_s'), 2)} "
                f"| {_fmt(lv['latency_s'].get('p50'))} | {_fmt(lv['latency_s'].get('p99'))} "
                f"| {_fmt(lv['ttft_s'].get('p50'))} | {lv['concurrency']} | {lv['errors']} |"
            )
    return [*rows, ""]


def open_loop_plot(result: dict, out_dir: Path, name: str, save) -> list[Path]:
    """Served vs offered rate, and latency vs offered rate; [] when no open-loop level ran."""
    if not any(x.get("open_loop") for x in result["sides"].values()):
        return []
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    top = 0.0
    for s in result["sides"]:
        lv, color = result["sides"][s].get("open_loop", []), COLOR[s]
        rate = [x["offered_rps"] for x in lv]
        top = max([top, *rate])
        axes[0].plot(rate, [x["requests_per_s"] for x in lv], "o-", color=color, label=f"{s} served")
        axes[0].plot(
            rate, [x["correct_answers_per_s"] or 0 for x in lv], "x:", color=color, label=f"{s} correct"
        )
        for key, style in (("p50", "o-"), ("p99", "^:")):
            axes[1].plot(
                rate,
                [x["latency_s"].get(key, float("nan")) for x in lv],
                style,
                color=color,
                label=f"{s} {key}",
            )
    axes[0].plot([0, top], [0, top], color="grey", lw=0.8, label="served = offered")
    axes[0].set(xlabel="offered requests / s (Poisson)", ylabel="requests / s", title="Served vs offered")
    axes[1].set(xlabel="offered requests / s (Poisson)", ylabel="seconds", title="Latency vs offered rate")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return [save(fig, out_dir / f"{name}_open_loop.png")]


def _swept(result: dict) -> dict[str, dict]:
    """Quality of each diffusion side that has a threshold sweep."""
    return {
        s: x["quality"]
        for s, x in result["sides"].items()
        if s != "ar" and x["quality"].get("threshold_sweep")
    }


def sweep_table(result: dict) -> list[str]:
    swept = _swept(result)
    if not swept:
        return []
    rows = [
        "## Diffusion decoding: threshold sweep",
        "",
        "Confidence threshold vs exact match and speed on the held-out prompts, decoded offline by the serving "
        "Engine. Each diffusion side is served (every load figure above and below) at the fewest forwards per "
        "answer token within 1 point of its best accuracy: "
        + ", ".join(f"{s} at **{q['threshold']}**" for s, q in swept.items())
        + ".",
        "",
        "| side | threshold | exact match | forwards / answer token | tokens / step | offline tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for side, q in swept.items():
        for x in q["threshold_sweep"]:
            mark = " (served)" if x["threshold"] == q["threshold"] else ""
            rows.append(
                f"| {side} | {x['threshold']}{mark} | {_fmt(x['accuracy'])} | {_fmt(x['forwards_per_token'])} "
                f"| {_fmt(x['tokens_per_step'], 2)} | {_fmt(x['offline_tokens_per_s'], 0)} |"
            )
    return [*rows, ""]


def sweep_plot(result: dict, out_dir: Path, name: str, save) -> list[Path]:
    swept = _swept(result)
    if not swept:
        return []
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for side, q in swept.items():
        pts = q["threshold_sweep"]
        ax.plot(
            [x["tokens_per_step"] for x in pts],
            [100 * x["accuracy"] for x in pts],
            "o-",
            color=COLOR[side],
            label=side,
        )
        for x in pts:
            ax.annotate(f"t={x['threshold']}", (x["tokens_per_step"], 100 * x["accuracy"]), fontsize=7,
                        xytext=(2, 4), textcoords="offset points")  # fmt: skip
    ar = result["sides"]["ar"]["quality"]
    ax.axhline(100 * ar["accuracy"], color=COLOR["ar"], ls="--", label="AR twin (1 token / step)")
    ax.set(
        xlabel="answer tokens per decoding step",
        ylabel="exact match (%)",
        title="Threshold: accuracy vs speed",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    return [save(fig, out_dir / f"{name}_threshold_sweep.png")]
