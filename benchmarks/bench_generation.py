"""Generation: accuracy vs speed of LLaDA decoding on a checkable task, with a model trained here.

Task: reverse a string of 4-12 digits (``diffmoe.generation.tasks.ReverseTask``). The SFT set goes
through the data pipeline (JSONL -> chat template -> Parquet, ``diffmoe.data``) with a
character-level tokenizer; a tiny LLaDA-MoE is trained on it with a plain AdamW loop and cached
under ``artifacts/generation/`` (``--retrain`` trains from scratch).

Compared on the same held-out prompts, canvas 32 tokens in blocks of 8:
- reference: LLaDA's sampler, one token per step (steps == gen_length), no cache, no early stop;
- threshold: Fast-dLLM confidence-threshold decoding (0.9);
- threshold + dual cache (block-boundary refresh); the same with early stop at the end token;
- the continuous-batching Engine (threshold + dual cache + early stop) at batch 1, 8 and 32.
Tokens are answer tokens (up to the end marker), counted from each method's own output; seconds
are medians over repeats because other processes may share the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from common import ROOT, write_result
from diffmoe.diffusion import diffusion_loss
from diffmoe.generation import DecodingConfig, Engine, generate
from diffmoe.generation.tasks import ReverseTask, make_examples, score, write_char_tokenizer, write_jsonl
from diffmoe.model import LLaDAMoEModelLM, named_config

TASK = ReverseTask(min_digits=4, max_digits=12)
# named_config("tiny") (hidden 64, 2 layers, 8 experts top-2) with wider experts and full KV heads.
MODEL = dict(num_key_value_heads=4, expert_intermediate_size=64, max_position_embeddings=128)
TRAIN = dict(examples=96000, seq_len=56, steps=3000, batch=32, lr=3e-3, warmup=100, seed=0)
GEN, BLOCK, THRESHOLD = 32, 8, 0.9
EVAL = dict(examples=256, seed=12345, repeats=3)
ART = ROOT / "artifacts" / "generation"


def fingerprint() -> str:
    spec = json.dumps({"task": repr(TASK), "model": MODEL, "train": TRAIN}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def build_data(root: Path):
    """Task JSONL -> SFT Parquet through the data pipeline -> (input_ids, response_mask, length)."""
    import pyarrow.parquet as pq

    from diffmoe.data import CorpusConfig, prepare_corpus, verify_dataset
    from diffmoe.data.manifest import shard_paths

    write_char_tokenizer(root / "tokenizer")
    write_jsonl(make_examples(TASK, TRAIN["examples"], seed=1), root / "train.jsonl")
    cfg = CorpusConfig(
        kind="sft",
        inputs=[str(root / "train.jsonl")],
        tokenizer={"path": str(root / "tokenizer")},
        seq_len=TRAIN["seq_len"],
        validation_fraction=0.0,
        output_dir=str(root / "sft"),
    )
    prepare_corpus(cfg)
    manifest = verify_dataset(root / "sft")
    tables = [pq.read_table(p) for p in shard_paths(root / "sft", manifest, "train")]
    ids = torch.cat([torch.tensor(t.column("input_ids").to_pylist()) for t in tables]).long()
    mask = torch.cat([torch.tensor(t.column("response_mask").to_pylist()) for t in tables]).bool()
    length = torch.cat([torch.tensor(t.column("length").to_pylist()) for t in tables]).long()
    return ids, mask, length


def random_canvas(length, seq_len, generator):
    """Key mask [B, seq_len] keeping each row's tokens plus a random number (>= 1) of EOS pads.

    Rows from the pipeline are all padded to seq_len; trained that way the model learns to locate
    answer positions from the sequence end and fails on any other canvas size. Random canvases
    make it independent of gen_length, as in LLaDA's SFT (pad per batch)."""
    room = (seq_len - length).clamp_min(1)
    total = length + 1 + (torch.rand(len(length), generator=generator) * room).long().clamp_max(room - 1)
    return torch.arange(seq_len)[None] < total[:, None]


def train(root: Path) -> tuple[LLaDAMoEModelLM, dict]:
    from diffmoe.data import load_tokenizer

    ids, response_mask, length = build_data(root)
    tok, special = load_tokenizer(root / "tokenizer")
    torch.manual_seed(TRAIN["seed"])
    config = named_config(
        "tiny",
        vocab_size=len(tok),
        mask_token_id=special.mask_id,
        eos_token_id=special.eos_id,
        pad_token_id=special.eos_id,
        **MODEL,
    )
    model = LLaDAMoEModelLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(TRAIN["seed"])
    order = torch.randperm(len(ids), generator=gen)
    start, log = time.perf_counter(), []
    for step in range(1, TRAIN["steps"] + 1):
        lr = TRAIN["lr"] * min(1.0, step / TRAIN["warmup"]) * (0.05 + 0.95 * (1 - step / TRAIN["steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        take = order[(step - 1) * TRAIN["batch"] % len(ids) :][: TRAIN["batch"]]
        keep = random_canvas(length[take], TRAIN["seq_len"], gen)
        loss = diffusion_loss(
            model,
            ids[take],
            mask_id=special.mask_id,
            response_mask=response_mask[take] & keep,
            attention_mask=keep.long(),
            generator=gen,
        )
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            log.append((step, round(loss.masked_ce.item(), 4)))
            print(
                f"step {step} masked_ce {loss.masked_ce.item():.4f} {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    info = {"train_seconds": round(time.perf_counter() - start, 1), "loss_log": log, "examples": len(ids)}
    model.save_pretrained(root / "model")
    (root / "train_info.json").write_text(json.dumps(info, indent=2))
    return model.eval(), info


def load_or_train(retrain: bool):
    from diffmoe.data import load_tokenizer

    root = ART / fingerprint()
    if retrain or not (root / "train_info.json").is_file():
        model, info = train(root)
    else:
        model = LLaDAMoEModelLM.from_pretrained(root / "model").eval()
        info = json.loads((root / "train_info.json").read_text())
    tok, special = load_tokenizer(root / "tokenizer")
    return model, tok, special, info


def prompt_ids(tok, examples):
    chat = [[{"role": "user", "content": ex.prompt}] for ex in examples]
    return [
        list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"]) for c in chat
    ]


def answer(ids, end_ids):
    out = []
    for t in ids:
        if t in end_ids:
            break
        out.append(t)
    return out


def run_generate(model, prompts, end_ids, **kw):
    outs, forwards = [], 0
    for p in prompts:
        stats: dict = {}
        x = generate(
            model,
            torch.tensor([p]),
            gen_length=GEN,
            block_length=BLOCK,
            mask_id=model.config.mask_token_id,
            stats=stats,
            **kw,
        )
        outs.append(answer(x[0, len(p) :].tolist(), end_ids))
        forwards += stats["forwards"]
    return outs, forwards


def run_engine(model, tok, prompts, end_ids, batch):
    engine = Engine(model, tok, max_batch_size=batch)
    cfg = DecodingConfig(
        gen_length=GEN, block_length=BLOCK, threshold=THRESHOLD, cache="dual", stop_token_ids=sorted(end_ids)
    )
    outs = engine.run(prompts, cfg)
    return [o.token_ids for o in outs], engine.forwards


def measure(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times), times


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["tokens_per_s"], 100 * r["accuracy"], s=40)
        ax.annotate(
            r["method"],
            (r["tokens_per_s"], 100 * r["accuracy"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("answer tokens / s (log scale)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(f"Reverse 4-12 digits, tiny LLaDA-MoE, CPU ({torch.get_num_threads()} threads)")
    ax.grid(True, which="both", alpha=0.3)
    lo = min(100 * r["accuracy"] for r in rows)
    ax.set_ylim(max(0, lo - 5), 100.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--retrain", action="store_true", help="ignore the cached checkpoint")
    parser.add_argument("--examples", type=int, default=EVAL["examples"])
    parser.add_argument("--repeats", type=int, default=EVAL["repeats"])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's own, one per core, as users get; 1 is steadier when "
        "other work shares the cores)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, special, info = load_or_train(args.retrain)
    role_end = tok.convert_tokens_to_ids("<|role_end|>")
    end_ids = {special.eos_id, role_end}
    examples = make_examples(TASK, args.examples, seed=EVAL["seed"])
    prompts = prompt_ids(tok, examples)

    methods = {
        "reference (1 tok/step)": lambda: run_generate(model, prompts, end_ids, steps=GEN),
        "threshold": lambda: run_generate(model, prompts, end_ids, steps=None, threshold=THRESHOLD),
        "threshold + dual cache": lambda: run_generate(
            model, prompts, end_ids, steps=None, threshold=THRESHOLD, cache="dual"
        ),
        "threshold + dual + early stop": lambda: run_generate(
            model, prompts, end_ids, steps=None, threshold=THRESHOLD, cache="dual", eos_id=sorted(end_ids)
        ),
    }
    for b in (1, 8, 32):
        methods[f"engine batch {b}"] = lambda b=b: run_engine(model, tok, prompts, end_ids, b)

    rows = []
    for name, fn in methods.items():
        (outs, forwards), seconds, times = measure(fn, args.repeats)
        texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
        acc = score(examples, texts)
        tokens = sum(len(o) for o in outs)
        row = {
            "method": name,
            "accuracy": acc["accuracy"],
            "answer_tokens": tokens,
            "seconds_median": round(seconds, 3),
            "seconds_all": [round(t, 3) for t in times],
            "tokens_per_s": round(tokens / seconds, 1),
            "forwards": forwards,
            "forwards_per_token": round(forwards / max(tokens, 1), 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    by = {r["method"]: r for r in rows}
    ref, b1, b32 = by["reference (1 tok/step)"], by["engine batch 1"], by["engine batch 32"]
    speedup_b1 = b1["tokens_per_s"] / ref["tokens_per_s"]
    batch_scaling = b32["tokens_per_s"] / b1["tokens_per_s"]
    acc_gap = 100 * (ref["accuracy"] - b1["accuracy"])
    out_png = ROOT / "docs" / "benchmarks" / "generation.png"
    out_png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out_png)
    write_result(
        "generation",
        command="make bench  # or: .venv/bin/python benchmarks/bench_generation.py [--retrain]",
        baseline="LLaDA reference sampler (steps == gen_length, no cache), batch 1, same model and prompts",
        ratio=speedup_b1,
        target_ratio=10,
        checks={
            "accuracy_within_1_point": acc_gap <= 1,
            "batch32_at_least_8x_batch1": batch_scaling >= 8,
        },
        target=">= 10x the reference sampler's tokens/s at batch 1 with accuracy within 1 point; "
        "batch-32 throughput >= 8x batch 1",
        details={
            "task": f"reverse {TASK.min_digits}-{TASK.max_digits} digits, {args.examples} held-out prompts",
            "decoding": {"gen_length": GEN, "block_length": BLOCK, "threshold": THRESHOLD},
            "model": {**MODEL, "parameters": sum(p.numel() for p in model.parameters())},
            "training": {**TRAIN, **info},
            "speedup_batch1_vs_reference": round(speedup_b1, 2),
            "accuracy_gap_points": round(acc_gap, 2),
            "batch32_over_batch1": round(batch_scaling, 2),
            # issue 21's own target for batch scaling (the check above is milestone 1's 8x)
            "batch32_at_least_6x_batch1": batch_scaling >= 6,
            "torch_threads": torch.get_num_threads(),
            "methods": rows,
            "plot": "docs/benchmarks/generation.png",
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
