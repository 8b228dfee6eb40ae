"""Draw docs/architecture.png: the data flow through Ray Data, Ray Train, MLflow and Ray Serve.

    .venv/bin/python docs/make_diagrams.py

The same diagram is kept as a Mermaid block in docs/architecture.md; change both together.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "architecture.png"

# (key, x, y, width, height, title, body lines, colour)
BOXES = [
    (
        "corpus",
        0.2,
        6.0,
        2.6,
        1.8,
        "Corpus",
        ["text / JSONL / Parquet", "local, s3://, gs://", "or the stdlib"],
        "#eeeeee",
    ),
    (
        "data",
        3.4,
        5.7,
        3.6,
        2.5,
        "Ray Data: jobs/prepare_corpus.py",
        [
            "read + clean (tasks)",
            "tokenize (ActorPoolStrategy)",
            "pack to seq_len (driver, ordered)",
            "Parquet shards + manifest.json",
            "(checksums, tokenizer hash)",
        ],
        "#dbeafe",
    ),
    (
        "train",
        7.6,
        5.5,
        4.0,
        2.9,
        "Ray Train V2: pretrain.py / finetune.py",
        [
            "TorchTrainer, one worker per GPU",
            "DeepSpeed ZeRO-1/2, bf16",
            "DeepSpeed-MoE expert parallel",
            "checkpoints -> run.storage_path",
            "HF export (safetensors)",
            "-> run.output_dir",
        ],
        "#dcfce7",
    ),
    (
        "mlflow",
        7.6,
        1.65,
        4.0,
        2.4,
        "MLflow tracking server",
        [
            "run per job (params, metrics",
            "from rank 0, config, manifest)",
            "artifact model/ + loss_curve.png",
            "runs:/<id>/model, models:/<name>/<v>",
        ],
        "#fef3c7",
    ),
    (
        "serve",
        2.6,
        1.2,
        4.4,
        3.3,
        "Ray Serve: deployments/diffmoe.yaml",
        [
            "HTTP proxy -> FastAPI ingress",
            "replica = ModelHost + Engine",
            "(continuous batching)",
            "ep_size > 1: workers in",
            "placement_group_bundles",
            "autoscaling on ongoing requests",
        ],
        "#fce7f3",
    ),
    ("clients", 0.1, 1.9, 1.9, 1.7, "Clients", ["OpenAI SDK", "curl", "/v1/*"], "#eeeeee"),
]

# (from, to, label, from side, to side)
ARROWS = [
    ("corpus", "data", "read", "right", "left"),
    ("data", "train", "data.path", "right", "left"),
    ("train", "mlflow", "log, model artifact", "bottom", "top"),
    ("mlflow", "serve", "model: runs:/ | models:/", "left", "right"),
    ("train", "serve", "or model: run.output_dir", "bottom", "top"),
    ("clients", "serve", "HTTP", "right", "left"),
]


def anchor(box, side):
    _, x, y, w, h = box[:5]
    return {
        "left": (x, y + h / 2),
        "right": (x + w, y + h / 2),
        "top": (x + w / 2, y + h),
        "bottom": (x + w / 2, y),
    }[side]


def main() -> int:
    fig, ax = plt.subplots(figsize=(12, 8.6))
    ax.set_xlim(0, 11.8)
    ax.set_ylim(0.8, 8.6)
    ax.axis("off")
    boxes = {b[0]: b for b in BOXES}
    for _key, x, y, w, h, title, body, colour in BOXES:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#333333"))
        ax.text(x + w / 2, y + h - 0.3, title, ha="center", va="center", fontsize=10.5, weight="bold")
        for i, line in enumerate(body):
            ax.text(x + w / 2, y + h - 0.75 - 0.38 * i, line, ha="center", va="center", fontsize=9)
    for src, dst, label, s_side, d_side in ARROWS:
        a, b = anchor(boxes[src], s_side), anchor(boxes[dst], d_side)
        if src == "train" and dst == "serve":
            a = (a[0] - 1.4, a[1])
            b = (b[0] + 1.2, b[1])
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=16, lw=1.4, color="#333333"))
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.15, label, ha="center", fontsize=8.5, color="#1f2937",
                bbox=dict(fc="white", ec="none", pad=1.5))  # fmt: skip
    ax.text(5.9, 8.45, "diffmoe: data flow (every stage is a `ray job submit` or `serve deploy` on one Ray cluster)",
            ha="center", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(OUT, dpi=100)
    plt.close(fig)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
