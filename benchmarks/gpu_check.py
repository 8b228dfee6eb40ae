"""GPU checks and figures for the model's CUDA paths (run by hand on a CUDA machine; not `make test`).

    PYTHONPATH=platform python benchmarks/gpu_check.py [OUT.json]   # default docs/benchmarks/gpu/<date>.json

1. Parity on CUDA: the grouped MoE layer equals the per-expert loop in fp32; the fused
   ``torch._grouped_mm`` bf16 path stays within bf16 error of the fp32 result, forward and backward.
2. MoE layer fwd+bwd (CUDA events): grouped vs the HF OLMoE-style loop vs a dense SwiGLU with the
   same active parameters, at the issue's shape and at the 7B-A1B layer shape, bf16.
3. The full 7B-A1B config in bf16 on one GPU: forward latency (serving) and fwd+bwd tokens/s
   (training, no optimizer), with model FLOP utilisation from active parameters.
4. The block-diffusion objective with the block-sparse flex mask (compiled) equals the dense mask
   (loss, gradients) and is timed against it at 2L = 4096.
5. ``gpu_platform.py``: the LLaDA2 block-diffusion Engine at the llada2-mini shape (batch 1 and 32,
   sampled); the training overhead against a bare loop at the 7B-A1B layer shape; the platform
   itself: ``jobs/prepare_corpus.py`` + ``jobs/pretrain.py`` on the GPU
   (Ray Train + DeepSpeed, bf16; the loss must fall, a checkpoint and the export must be written)
   and one sampled chat request to that model served by Ray Serve over HTTP. This part needs the
   project installed (``make install``: Ray, DeepSpeed, MLflow); ``--model-only`` skips it.
Any part that fails (a device error anywhere) fails the whole check, loudly, after the others ran.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from diffmoe.model import LLaDAMoEConfig, LLaDAMoEModelLM, count_parameters, named_config
from diffmoe.model.grouped_mm import _use_fused_kernel
from diffmoe.model.layers import SwiGLU
from diffmoe.model.modeling import MoE
from diffmoe.rng import device_generator


class ExpertLoop(nn.Module):
    """The Hugging Face OLMoE block: a python loop over all experts, torch.where + index_add_."""

    def __init__(self, moe: MoE, k: int):
        super().__init__()
        self.gate, self.k = moe.gate, k
        e, two_i, h = moe.experts.gate_up_proj.shape
        width = two_i // 2
        self.experts = nn.ModuleList(SwiGLU(h, width) for _ in range(e))
        with torch.no_grad():
            for j, expert in enumerate(self.experts):
                expert.gate_proj.weight.copy_(moe.experts.gate_up_proj[j, :width])
                expert.up_proj.weight.copy_(moe.experts.gate_up_proj[j, width:])
                expert.down_proj.weight.copy_(moe.experts.down_proj[j])

    def forward(self, x):
        flat = x.view(-1, x.shape[-1])
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        weights, selected = torch.topk(probs, self.k, dim=-1)
        out = torch.zeros_like(flat)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            idx, rows = torch.where(mask[e])
            out.index_add_(0, rows, expert(flat[rows]) * weights[rows, idx, None].to(x.dtype))
        return out.view_as(x)


def cuda_time(fn, reps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return sorted(samples)[len(samples) // 2]


def layer(e, k, h, width, dtype):
    cfg = LLaDAMoEConfig(
        vocab_size=32, hidden_size=h, expert_intermediate_size=width, num_hidden_layers=1,
        num_attention_heads=4, num_experts=e, num_experts_per_tok=k, mask_token_id=1,
        pad_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    moe = MoE(cfg).cuda()
    for p in moe.parameters():
        nn.init.normal_(p, std=0.02)
    return moe.to(dtype)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def parity() -> dict:
    # Values rounded to bf16 first, so both precisions route identically (the router runs in fp32
    # either way) and the comparison measures the matmuls, not near-tied top-k flips.
    moe32 = layer(64, 8, 256, 128, torch.float32)
    with torch.no_grad():
        for p in moe32.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    loop32 = ExpertLoop(moe32, 8).cuda()
    x = torch.randn(4096, 256, device="cuda").to(torch.bfloat16).float().requires_grad_()
    y32 = moe32(x[None])[0][0]
    torch.testing.assert_close(y32, loop32(x[None])[0], atol=1e-5, rtol=1e-4)
    y32.square().mean().backward()
    gx32, gw32 = x.grad.clone(), moe32.experts.gate_up_proj.grad.clone()
    moe16 = layer(64, 8, 256, 128, torch.bfloat16)
    moe16.load_state_dict({k: v.to(torch.bfloat16) for k, v in moe32.state_dict().items()})
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    fused = _use_fused_kernel(xb, moe16.experts.gate_up_proj)
    y16 = moe16(xb[None])[0][0]
    y16.float().square().mean().backward()
    out = {
        "fp32_grouped_equals_loop": True,
        "bf16_fused_grouped_mm_used": fused,
        "bf16_vs_fp32_rel_err": {
            "output": rel_err(y16, y32),
            "grad_x": rel_err(xb.grad, gx32),
            "grad_gate_up": rel_err(moe16.experts.gate_up_proj.grad, gw32),
        },
    }
    assert max(out["bf16_vs_fp32_rel_err"].values()) < 2e-2, out
    # whole tiny model: CUDA fp32 logits equal CPU fp32 logits
    cfg = named_config("tiny")
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(cfg).eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.cuda()(ids.cuda()).logits.cpu()
    out["tiny_model_cuda_vs_cpu_max_abs_diff"] = (gpu - cpu).abs().max().item()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
    return out


def moe_speed(e, k, h, width, tokens) -> dict:
    moe = layer(e, k, h, width, torch.bfloat16)
    loop = ExpertLoop(moe, k).cuda().to(torch.bfloat16)
    dense = SwiGLU(h, k * width).cuda().to(torch.bfloat16)
    x = torch.randn(1, tokens, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fns = {
        "grouped": lambda: moe(x)[0].float().square().mean().backward(),
        "olmoe_loop": lambda: loop(x).float().square().mean().backward(),
        "dense_swiglu": lambda: dense(x).float().square().mean().backward(),
    }
    seconds = {name: cuda_time(fn) for name, fn in fns.items()}
    flops = 6 * tokens * k * 3 * h * width  # fwd+bwd of the routed SwiGLU matmuls
    return {
        "shape": {"experts": e, "top_k": k, "hidden": h, "expert_width": width, "tokens": tokens},
        "seconds_fwd_bwd_median": seconds,
        "speedup_vs_loop": seconds["olmoe_loop"] / seconds["grouped"],
        "slowdown_vs_dense_ffn": seconds["grouped"] / seconds["dense_swiglu"],
        "grouped_tflops": flops / seconds["grouped"] / 1e12,
    }


def model_7b() -> dict:
    cfg = named_config("llada-moe-7b-a1b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LLaDAMoEModelLM(cfg).to(torch.bfloat16)
    counts = count_parameters(model)
    out = {"parameters": counts}
    active = counts["active"] if isinstance(counts, dict) and "active" in counts else None
    model.eval()
    for batch, length in ((1, 1024), (32, 1024)):
        ids = torch.randint(3, cfg.vocab_size - 10, (batch, length), device="cuda")
        with torch.no_grad():
            sec = cuda_time(lambda ids=ids: model(ids), reps=10, warmup=3)
        out[f"forward_b{batch}_l{length}_s"] = sec
        out[f"forward_b{batch}_l{length}_tokens_per_s"] = batch * length / sec
    model.train()
    model.gradient_checkpointing = False
    batch, length = 4, 2048
    ids = torch.randint(3, cfg.vocab_size - 10, (batch, length), device="cuda")

    def step():
        model(ids).logits.float().logsumexp(-1).mean().backward()

    sec = cuda_time(step, reps=5, warmup=2)
    out["train_fwd_bwd_b4_l2048_s"] = sec
    out["train_tokens_per_s"] = batch * length / sec
    if active:
        out["train_mfu_vs_790_tflops"] = 6 * active * batch * length / sec / 790e12
    out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    model.zero_grad(set_to_none=True)
    out["engine"] = engine_speed(model.eval())
    return out


def engine_speed(model) -> dict:
    """The batching Engine on the 7B shape (random weights, so a fixed schedule: confidence-based
    decoding would measure nothing). 128-token prompts, 128-token answers, EOS ignored."""
    from diffmoe.generation import DecodingConfig, Engine

    gen = device_generator("cpu", 0)
    prompts = [torch.randint(3, 1000, (128,), generator=gen).tolist() for _ in range(32)]
    settings = {
        "llada_reference_1_token_per_step_no_cache": dict(steps=128, cache="none"),
        "dual_cache_4_tokens_per_step": dict(steps=32, cache="dual"),
        # sampled, seeded requests: every draw uses the request's generator on the GPU
        "dual_cache_sampled_t0.7": dict(steps=32, cache="dual", temperature=0.7, seed=0),
    }
    out = {}
    for name, extra in settings.items():
        cfg = DecodingConfig(gen_length=128, block_length=32, ignore_eos=True, **extra)
        for batch in (1, 32):
            engine = Engine(model, max_batch_size=32)
            engine.run(prompts[:1], cfg)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            done = engine.run(prompts[:batch], cfg)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            tokens = sum(len(o.token_ids) for o in done)
            out[f"{name}_batch{batch}"] = {"seconds": seconds, "output_tokens_per_s": tokens / seconds}
    return out


def sampled_generate() -> dict:
    """``generate`` with temperature > 0 and a CUDA generator on a small model: fails on any draw
    whose generator is on another device (the CPU-generator bug this check guards against)."""
    from diffmoe.generation import generate

    cfg = named_config("tiny")
    with torch.device("cuda"):
        model = LLaDAMoEModelLM(cfg).to(torch.bfloat16).eval()
        prompt = torch.randint(3, cfg.vocab_size - 10, (4, 16))
    out = generate(
        model,
        prompt,
        gen_length=32,
        steps=16,
        block_length=16,
        temperature=0.8,
        remasking="random",
        mask_id=cfg.mask_token_id,
        generator=device_generator(prompt.device, 0),
    )
    return {"shape": list(out.shape), "device": str(out.device)}


def flex_block_attention() -> dict:
    """The block-diffusion objective on CUDA with the block-sparse flex mask (compiled, what
    ``attention: auto`` picks on GPU) against the dense [B, 1, 2L, 2L] mask: loss and gradients
    agree (fp32), and the time of one fwd+bwd at 2L = 4096 in bf16 for both."""
    from diffmoe.diffusion.blocks import BlockObjectiveConfig, block_diffusion_loss
    from diffmoe.model import LLaDA2MoeModelLM, llada2_named_config

    def loss_and_grads(model, x, docs, attention):
        model.zero_grad(set_to_none=True)
        obj = BlockObjectiveConfig(block_length=32, attention=attention)
        terms = block_diffusion_loss(
            model, x, mask_id=1, objective=obj, document_ids=docs, generator=device_generator(x.device, 0)
        )
        terms.total.backward()
        return terms.total.detach(), torch.cat(
            [q.grad.flatten() for q in model.parameters() if q.grad is not None]
        )

    torch.manual_seed(0)
    cfg = llada2_named_config("llada2-tiny", vocab_size=512, mask_token_id=1)
    out = {}
    with torch.device("cuda"):
        model = LLaDA2MoeModelLM(cfg).train()
        x = torch.randint(3, 512, (2, 512))
        docs = torch.cat([torch.zeros(2, 200, dtype=torch.long), torch.ones(2, 312, dtype=torch.long)], 1)
    (ld, gd), (lf, gf) = (loss_and_grads(model, x, docs, a) for a in ("dense", "flex"))
    out["fp32_loss_rel_err"] = rel_err(lf, ld)
    out["fp32_grad_rel_err"] = rel_err(gf, gd)
    model = model.to(torch.bfloat16)
    with torch.device("cuda"):
        x = torch.randint(3, 512, (1, 2048))
    for attention in ("dense", "flex"):
        out[f"bf16_fwd_bwd_s_2L4096_{attention}"] = cuda_time(
            lambda a=attention: loss_and_grads(model, x, None, a), reps=5, warmup=2
        )
    if out["fp32_loss_rel_err"] > 1e-4 or out["fp32_grad_rel_err"] > 1e-3:
        raise AssertionError(f"flex and dense block-diffusion paths disagree: {out}")
    return out


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = args[0] if args else f"docs/benchmarks/gpu/{time.strftime('%Y-%m-%d')}.json"
    parts = [
        ("parity", parity),
        ("sampled_generate", sampled_generate),
        ("flex_block_attention", flex_block_attention),
        ("moe_layer_issue_shape", lambda: moe_speed(64, 8, 256, 128, 4096)),
        ("moe_layer_7b_shape", lambda: moe_speed(64, 8, 2048, 1024, 16384)),
        ("model_7b_a1b_bf16", model_7b),
    ]
    if "--model-only" not in sys.argv:
        import tempfile
        from pathlib import Path

        from gpu_platform import llada2_engine, train_and_serve, train_overhead

        work = tempfile.mkdtemp(prefix="gpu-check-")
        parts += [
            ("llada2_mini_engine_bf16", llada2_engine),
            ("ray_train_deepspeed_then_serve", lambda: train_and_serve(Path(work))),
            ("train_overhead_7b_a1b_layers", lambda: train_overhead(Path(work) / "overhead")),
        ]
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),  # GPU figures carry their own date and command
        "command": f"PYTHONPATH=platform python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}".strip(),
    }
    t0 = time.time()
    for name, fn in parts:
        try:
            result[name] = fn()
        except Exception as err:  # keep the other figures when one part fails
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        print(name, json.dumps(result[name]), flush=True)
        torch.cuda.empty_cache()
    result["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    failed = [name for name, part in result.items() if isinstance(part, dict) and "error" in part]
    if failed:  # loud: a device error anywhere fails the check
        sys.exit(f"gpu_check FAILED in {failed}; details in {path}")


if __name__ == "__main__":
    main()
