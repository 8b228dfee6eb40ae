"""The comparison's report: ``<name>.json`` (the benchmark result format), ``<name>.md`` with tables,
and PNG plots (throughput vs concurrency, latency percentiles, accuracy vs tokens/s)."""

from __future__ import annotations

import json
import os
import platform as _platform
import sys
import time
from pathlib import Path

from . import report_sections as sections

LABEL = {
    "dllm": "dLLM (masked diffusion)",
    "ar": "AR twin (causal)",
    "block": "block diffusion (converted from the AR twin)",
}
STYLE = {"dllm": ("o-", "C0"), "ar": ("s--", "C1"), "block": ("D-.", "C2")}
HEADLINE_LEVEL = 16
TARGET_RATIO = 1.5  # best diffusion side / AR correct answers/s at HEADLINE_LEVEL, both at the target


def machine() -> dict:
    import torch

    info = {
        "cpu": _platform.processor() or _platform.machine(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, StopIteration):
        pass
    return info


def headline(result: dict) -> dict:
    """The best diffusion side / AR correct answers per second at concurrency 16 (the highest level
    run if 16 was not), measured under load. Only sides that reached the target accuracy are
    compared: a speed ratio between models of unequal quality is not computed, and when the AR twin
    or every diffusion side missed the target there is no ratio at all."""
    sides = list(result["sides"])
    levels = [lv["concurrency"] for lv in result["sides"]["ar"]["load"]]
    c = HEADLINE_LEVEL if HEADLINE_LEVEL in levels else max(levels)
    at = {s: next(lv for lv in result["sides"][s]["load"] if lv["concurrency"] == c) for s in sides}
    acc = {s: result["sides"][s]["quality"]["accuracy"] for s in sides}
    target = result["config"]["task"].get("target_accuracy", 0.97)
    short = [s for s in sides if acc[s] < target]
    correct = {s: at[s].get("correct_answers_per_s") for s in sides}
    if correct["ar"] is None:  # a result from before answers were scored under load
        correct = {s: at[s]["requests_per_s"] * acc[s] for s in sides}
    reached = [s for s in sides if s != "ar" and s not in short]
    best = max(reached, key=lambda s: correct[s] or 0.0) if reached and "ar" not in short else None
    lat = at[best or "dllm"]["latency_s"]
    return {
        "concurrency": c,
        "target_accuracy": target,
        "below_target": short,  # sides that did not reach it (never compared)
        "quality_matched": best is not None,  # the AR twin and at least one diffusion side reached it
        "compared_side": best,  # the fastest diffusion side among those that reached the target
        "accuracy": acc,
        "correct_answers_per_s": correct,
        "output_tokens_per_s": {s: at[s]["output_tokens_per_s"] for s in sides},
        "dllm_correct_answers_per_s": correct["dllm"],
        "ar_correct_answers_per_s": correct["ar"],
        "dllm_output_tokens_per_s": at["dllm"]["output_tokens_per_s"],
        "ar_output_tokens_per_s": at["ar"]["output_tokens_per_s"],
        "ratio": correct[best] / correct["ar"] if best and correct["ar"] else None,
        # p99 / p50 of the compared side (the masked-diffusion side when none is compared)
        "p99_over_p50": lat["p99"] / lat["p50"] if lat.get("p50") else None,
        "accuracy_gap_points": 100 * (acc["dllm"] - acc["ar"]),
        "stops_at_end_marker": not result["config"]["load"]["ignore_eos"],
        "cost_to_target": {s: sections.cost_to_target(result, s) for s in sides},
    }


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def load_table(result: dict) -> list[str]:
    rows = [
        "| side | conc. | requests | req/s | served acc. | correct/s | out tok/s | p50 s | p99 s | TTFT p50 s "
        "| TTFT p99 s | replica CPU-s / 1k tok | replica CPU-s / 1k correct | machine CPU-s / 1k tok | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side in result["sides"]:
        for lv in result["sides"][side]["load"]:
            rows.append(
                f"| {side} | {lv['concurrency']} | {lv['requests']} | {_fmt(lv['requests_per_s'], 2)} "
                f"| {_fmt(lv.get('served_accuracy'))} | {_fmt(lv.get('correct_answers_per_s'), 2)} "
                f"| {_fmt(lv['output_tokens_per_s'], 1)} | {_fmt(lv['latency_s'].get('p50'))} "
                f"| {_fmt(lv['latency_s'].get('p99'))} | {_fmt(lv['ttft_s'].get('p50'))} "
                f"| {_fmt(lv['ttft_s'].get('p99'))} | {_fmt(lv.get('replica_cpu_s_per_1k_tokens'), 2)} "
                f"| {_fmt(lv.get('replica_cpu_s_per_1k_correct'), 1)} "
                f"| {_fmt(lv.get('machine_cpu_s_per_1k_tokens'), 2)} | {lv['errors']} |"
            )
    return rows


def markdown(result: dict, command: str, info: dict, plots: list[str], date: str) -> str:
    cfg, h = result["config"], result["headline"]
    q = {s: result["sides"][s]["quality"] for s in result["sides"]}
    t = {s: result["sides"][s]["train"] for s in result["sides"]}
    lines = [
        "# Diffusion MoE vs its autoregressive twin, under load",
        "",
        f"Generated by `diffmoe.bench` on {date}; numbers below are measured, not edited.",
        "",
        "## Machine",
        "",
        "```",
        json.dumps(info, indent=2),
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "# the same comparison as a Ray job on a running cluster (report files land in the job's working",
        "# directory unless output.report_dir is an absolute path):",
        "ray job submit --working-dir . -- python jobs/benchmark.py --config jobs/configs/benchmark_dllm_vs_ar.yaml",
        "```",
        "",
        "## Setup",
        "",
        f"- Same backbone (`{cfg['model']['name']}` + {cfg['model']['overrides']}, {q['dllm']['parameters']:,} "
        "parameters each); the AR twin differs only by `model.overrides.causal: true` (causal mask, next-token loss).",
        f"- Same data: task `{cfg['task']['name']}` ({cfg['task']['min_digits']}-{cfg['task']['max_digits']} digits), "
        f"{result['data']['train_rows']} SFT rows of {cfg['task']['seq_len']} tokens through the data pipeline; "
        f"{result['data']['validation_rows']} held-out validation rows.",
        f"- Same budget: {cfg['train']['steps']} steps x {cfg['train']['micro_batch_size']} rows x "
        f"{cfg['train']['num_workers']} worker(s) of {cfg['task']['seq_len']} tokens, trained by the platform's "
        "training job (`run_training`: Ray Train + DeepSpeed), lr "
        f"{cfg['train']['lr']}, cosine schedule over the budget. Both are trained with the SFT objective from "
        "scratch on the task"
        + (
            f", each until it reaches the target (checked every {cfg['train']['check_every']} steps) or the "
            "budget: see *Cost to reach quality*."
            if cfg["train"].get("check_every")
            else "."
        ),
        *_block_setup(result),
        f"- Same server: the Ray Serve app (`run_app`), 1 replica each ({cfg['load']['replica_cpus']} CPUs, "
        f"{cfg['load']['replica_gpus']} GPUs), continuous batching up to {cfg['load']['max_batch_size']} requests; "
        "the Engine decodes the causal model autoregressively with a KV cache.",
        f"- Decoding: dLLM = confidence-threshold parallel decoding ({q['dllm'].get('threshold', cfg['decoding']['threshold'])}, "
        f"`{cfg['decoding']['cache']}` cache) over a canvas = the rest of a training row; AR = "
        f"{'greedy' if cfg['decoding']['temperature'] == 0 else 'sampled'} next-token decoding (KV cache) with "
        "the same cap. In the accuracy evaluation both stop at the end marker.",
        f"- Load: the same {cfg['load']['prompts']} held-out prompts (token ids) in the same order, streamed "
        "completions, closed loop; levels alternate sides (one level of each in turn) so machine noise hits all. "
        + (
            "Every answer is decoded to its full canvas on both sides (`ignore_eos`): same answer lengths, "
            "the EOS padding the models learned counts as output. The offline tok/s in the quality table "
            "stops at the end marker instead."
            if cfg["load"]["ignore_eos"]
            else "Each side stops at its own end marker (answer lengths may differ)."
        ),
        "- CPU-seconds per 1k output tokens: the replica process's CPU time (user + system, psutil) over the level; "
        "machine = all busy CPU time on the machine (proxy, controller, load generator included, and any other "
        "process that ran meanwhile).",
        f"- Load average (1, 5, 15 min) at the start: {result.get('load_average_at_start')}, at the end: "
        f"{info.get('load_average_at_end')} on {info.get('cores')} cores"
        + (
            ": **other processes were using the machine, so absolute figures are low and noisy**; "
            "both sides ran interleaved under the same conditions."
            # the 1-minute figure: what ran when the benchmark started (the 5 and 15-minute ones
            # still carry whatever ran before)
            if (result.get("load_average_at_start") or [0])[0] > (info.get("cores") or 1)
            else "."
        ),
        "- `train s` is the wall time of the training job, Ray Train start-up and export included.",
        "",
        "## Headline",
        "",
        *_headline_lines(h),
        "",
        *_reading(h, result),
        "",
        "## Quality",
        "",
        "| side | val loss / token (nats) | what it is | exact-match accuracy | offline tok/s | forwards / token "
        "| train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in q:
        lines.append(
            f"| {s} | {q[s]['val_loss_per_token']:.4f} | {q[s]['val_loss_kind']} | "
            f"{q[s]['accuracy']:.3f} ({q[s]['correct']}/{q[s]['total']}) | {q[s]['offline_tokens_per_s']:.1f} "
            f"| {q[s]['forwards_per_token']:.3f} | {t[s]['train_seconds']} |"
        )
    lines += [
        "",
        "The diffusion figure is an upper bound on the NLL (the masked-diffusion ELBO, estimated with "
        f"{cfg['decoding']['val_draws']} mask draws per row); the AR figure is the exact NLL. Both are over the "
        "same scored tokens (response + EOS padding, as the SFT objective scores them). A bound above the "
        "AR NLL does not by itself mean a worse model.",
        "",
        "## Load",
        "",
        *load_table(result),
        "",
        *sections.training_cost_table(result),
        *sections.sweep_table(result),
        *sections.open_loop_table(result),
        *[f"![{Path(p).stem}]({Path(p).name})" for p in plots],
        "",
    ]
    return "\n".join(lines)


def _block_setup(result: dict) -> list[str]:
    """The third side's setup line, when it ran."""
    if "block" not in result["sides"]:
        return []
    b, q = result["config"]["block"], result["sides"]["block"]["quality"]
    return [
        f"- Block diffusion (`block`): the trained AR twin's weights mapped onto the LLaDA2 layout and trained "
        f"on by the same job (up to {b['steps']} more steps, lr {b['lr']}, block-size ladder {b['ladder']} then "
        f"{b['block_length']}; {result['sides']['block']['train']['tokens']:,} tokens on top of the AR twin's), "
        f"decoded in blocks of {b['block_length']} with threshold {q.get('threshold')} and exact block caching."
    ]


def _headline_lines(h: dict) -> list[str]:
    """The headline sentence, computed: no speed ratio between sides of different quality."""
    c, target = h["concurrency"], h["target_accuracy"]
    correct = h.get("correct_answers_per_s") or {
        "dllm": h["dllm_correct_answers_per_s"],
        "ar": h["ar_correct_answers_per_s"],
    }
    record = ", ".join(f"{s} {_fmt(v, 2)}" for s, v in correct.items())
    if not h["quality_matched"]:
        return [
            f"**Not compared**: {', '.join(h['below_target'])} did not reach the target exact match "
            f"{target} on the held-out prompts, so no speed ratio is computed (a faster wrong model is not "
            f"a result). For the record, correct answers/s at concurrency {c}: {record}."
        ]
    best = h.get("compared_side") or "dllm"
    out = h.get("output_tokens_per_s") or {
        "dllm": h["dllm_output_tokens_per_s"],
        "ar": h["ar_output_tokens_per_s"],
    }
    p99 = h.get("p99_over_p50", h.get("dllm_p99_over_p50"))
    missed = list(h["below_target"])
    others = [s for s in correct if s not in ("ar", best) and s not in missed]
    return [
        f"The AR twin and {best} reach the target exact match ({target})"
        + (f", as does {', '.join(others)}" if others else "")
        + (f"; {', '.join(missed)} did not and is not compared" if missed else "")
        + f". {best} is the fastest diffusion side that did. At concurrency {c}, "
        + (
            "each side stopping at its own end marker"
            if h.get("stops_at_end_marker", True)
            else "every canvas decoded fully (`ignore_eos`, not the headline setting)"
        )
        + f": {best} {correct[best]:.2f} vs AR {correct['ar']:.2f} correct answers/s: **ratio {h['ratio']:.3f}** "
        f"({best} / AR; target >= {TARGET_RATIO}); output tokens/s {out[best]:.1f} vs {out['ar']:.1f}; {best} "
        f"p99 / p50 latency {_fmt(p99, 2)} (target <= 2). All sides, correct answers/s: {record}."
    ]


def _reading(h: dict, result: dict) -> list[str]:
    """Plain statements the numbers support (computed, so they cannot drift from the tables)."""
    out = []
    if abs(h["accuracy_gap_points"]) > 1:
        steps = {s: result["sides"][s]["train"]["steps"] for s in ("dllm", "ar")}
        out.append(
            f"Accuracy gap {h['accuracy_gap_points']:+.1f} points (dLLM - AR), after {steps['dllm']} and "
            f"{steps['ar']} training steps."
        )
    return out


def plots(result: dict, out_dir: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = result["sides"]
    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for s in sides:
        lv = sides[s]["load"]
        ax.plot(
            [x["concurrency"] for x in lv],
            [x["output_tokens_per_s"] for x in lv],
            STYLE[s][0],
            label=LABEL[s],
        )
    ax.set(xlabel="concurrency", ylabel="output tokens / s", title="Throughput vs concurrency")
    _concurrency_axis(ax, sides)
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / f"{name}_throughput.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in sides:
        lv, color = sides[s]["load"], STYLE[s][1]
        c = [x["concurrency"] for x in lv]
        for key, style in (("p50", "o-"), ("p99", "^:")):
            axes[0].plot(
                c, [x["latency_s"].get(key, float("nan")) for x in lv], style, color=color, label=f"{s} {key}"
            )
            axes[1].plot(
                c, [x["ttft_s"].get(key, float("nan")) for x in lv], style, color=color, label=f"{s} {key}"
            )
    for ax, title in zip(axes, ("request latency", "time to first token")):
        _concurrency_axis(ax, sides)
        ax.set(xlabel="concurrency", ylabel="seconds", title=title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / f"{name}_latency.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for s in sides:
        acc = 100 * sides[s]["quality"]["accuracy"]
        lv = sides[s]["load"]
        ax.plot([x["output_tokens_per_s"] for x in lv], [acc] * len(lv), STYLE[s][0][0] + "-", label=LABEL[s])
        for x in lv:
            ax.annotate(
                f"c={x['concurrency']}",
                (x["output_tokens_per_s"], acc),
                fontsize=7,
                xytext=(2, 4),
                textcoords="offset points",
            )
    ax.set(
        xlabel="served output tokens / s (per concurrency level)",
        ylabel="exact-match accuracy (%)",
        title="Accuracy vs throughput",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / f"{name}_accuracy.png"))
    return (
        paths
        + sections.sweep_plot(result, out_dir, name, _save)
        + sections.open_loop_plot(result, out_dir, name, _save)
    )


def _concurrency_axis(ax, sides) -> None:
    levels = sorted({x["concurrency"] for s in sides for x in sides[s]["load"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rerender(json_path: str | Path) -> list[Path]:
    """Rewrite the markdown and plots from a written ``<name>.json`` (same measurements, same
    machine record): for report-format changes without re-running the comparison."""
    path = Path(json_path)
    body = json.loads(path.read_text())
    result = {k: v for k, v in body["details"].items() if k != "plots"}
    result["headline"] = headline(result)
    return write(
        result, path.parent, body["benchmark"], body["command"], info=body["machine"], date=body["date"]
    )


def write(
    result: dict, out_dir: Path, name: str, command: str, info: dict | None = None, date: str | None = None
) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and the plots into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = info or machine()
    pngs = plots(result, out_dir, name)
    h = result["headline"]
    checks = {
        "ar_and_a_diffusion_side_reached_target_accuracy": h["quality_matched"],
        "compared_side_p99_within_2x_p50": h["p99_over_p50"] is not None and h["p99_over_p50"] <= 2.0,
    }
    body = {
        "benchmark": name,
        "machine": info,
        "command": command,
        "baseline": f"the AR twin (same backbone, data, token budget, server): correct answers/s at "
        f"concurrency {h['concurrency']}, each side stopping at its own end marker; ours = the fastest "
        "diffusion side that reached the target accuracy",
        # 0 when the sides' quality differs: no speed ratio between unequal models
        "ratio": round(float(h["ratio"]), 4) if h["ratio"] is not None else 0.0,
        "target": f"every compared side reaches >= {h['target_accuracy']} exact match on held-out prompts; "
        f"then the best diffusion side serves >= {TARGET_RATIO}x the AR twin's correct answers/s at concurrency "
        f"{h['concurrency']} with p99 <= 2x p50",
        "target_ratio": TARGET_RATIO,
        "checks": checks,
        "met": bool(
            h["ratio"] is not None and round(float(h["ratio"]), 4) >= TARGET_RATIO and all(checks.values())
        ),
        "details": {**result, "plots": [p.name for p in pngs]},
        "date": date or time.strftime("%Y-%m-%d"),
    }
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps(body, indent=2, default=str) + "\n")
    md = out_dir / f"{name}.md"
    md.write_text(markdown(result, command, info, [p.name for p in pngs], body["date"]))
    return [js, md, *pngs]
