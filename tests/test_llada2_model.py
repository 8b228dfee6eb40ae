"""LLaDA2 model: parity with a naive reference written here, published checkpoint layout, Auto
classes, KV cache, named sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from diffmoe.model import LLaDA2MoeConfig, LLaDA2MoeModelLM, count_parameters, llada2_named_config

BASE = dict(
    vocab_size=89,
    hidden_size=32,
    intermediate_size=40,
    moe_intermediate_size=12,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=8,
    num_shared_experts=1,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    norm_topk_prob=True,
    partial_rotary_factor=0.5,
    rotary_dim=4,
    rope_theta=1000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=64,
    pad_token_id=0,
    eos_token_id=0,
    mask_token_id=1,
)

VARIANTS = {
    "shared_dense_gqa_partial_groups": {},
    "no_shared_full_rotary_one_group": dict(
        num_shared_experts=0,
        partial_rotary_factor=1.0,
        rotary_dim=8,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        num_key_value_heads=4,
    ),
    "two_shared_all_groups_biases": dict(
        num_shared_experts=2,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        first_k_dense_replace=2,
        use_qkv_bias=True,
        use_bias=True,
        num_key_value_heads=1,
    ),
}


# ---- the naive reference: float64, per token, per expert, straight from the published keys ----


def published_layout(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every key and shape of a published LLaDA2 checkpoint for this config."""
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    nh, nkv, e = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_experts"]
    out = {"model.word_embeddings.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "attention.query_key_value.weight"] = ((nh + 2 * nkv) * hd, h)
        if cfg.get("use_qkv_bias"):
            out[p + "attention.query_key_value.bias"] = ((nh + 2 * nkv) * hd,)
        out[p + "attention.query_layernorm.weight"] = (hd,)
        out[p + "attention.key_layernorm.weight"] = (hd,)
        out[p + "attention.dense.weight"] = (h, nh * hd)
        if cfg.get("use_bias"):
            out[p + "attention.dense.bias"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if i < cfg["first_k_dense_replace"]:
            widths = {"mlp.": cfg["intermediate_size"]}
        else:
            out[p + "mlp.gate.weight"] = (e, h)
            out[p + "mlp.gate.expert_bias"] = (e,)
            widths = {f"mlp.experts.{j}.": cfg["moe_intermediate_size"] for j in range(e)}
            if cfg.get("num_shared_experts"):
                widths["mlp.shared_experts."] = cfg["moe_intermediate_size"] * cfg["num_shared_experts"]
        for prefix, width in widths.items():
            out[p + prefix + "gate_proj.weight"] = (width, h)
            out[p + prefix + "up_proj.weight"] = (width, h)
            out[p + prefix + "down_proj.weight"] = (h, width)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (cfg["vocab_size"], h)
    return out


def random_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in published_layout(cfg).items():
        if k.endswith("layernorm.weight") or k == "model.norm.weight":
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif k.endswith("expert_bias"):
            sd[k] = 0.2 * torch.randn(shape, generator=gen)
        else:
            sd[k] = 0.3 * torch.randn(shape, generator=gen)
    return sd


def _rms(x, w, eps):
    return x / math.sqrt(float((x * x).mean()) + eps) * w


def _swiglu(x, sd, prefix):
    g = sd[prefix + "gate_proj.weight"] @ x
    return sd[prefix + "down_proj.weight"] @ (g / (1 + torch.exp(-g)) * (sd[prefix + "up_proj.weight"] @ x))


def _rope(vec, pos, rot, theta):
    out = vec.clone()
    half = rot // 2
    for i in range(half):
        angle = pos / theta ** (2 * i / rot)
        a, b = vec[i], vec[i + half]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def _route(x, sd, prefix, cfg):
    """Sigmoid scores; bias for choosing; best groups by their top-2 sum; top-k inside them."""
    e, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    logits = (sd[prefix + "gate.weight"] @ x).tolist()
    scores = [1 / (1 + math.exp(-v)) for v in logits]
    choice = [s + float(b) for s, b in zip(scores, sd[prefix + "gate.expert_bias"])]
    size = e // cfg["n_group"]
    group_score = {
        g: sum(sorted(choice[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(cfg["n_group"])
    }
    kept = sorted(group_score, key=lambda g: -group_score[g])[: cfg["topk_group"]]
    allowed = [j for g in kept for j in range(g * size, (g + 1) * size)]
    chosen = sorted(allowed, key=lambda j: -choice[j])[:k]
    total = sum(scores[j] for j in chosen)
    return [(j, scores[j] / total * cfg["routed_scaling_factor"]) for j in chosen]


def reference_logits(sd, cfg, ids, mask=None):
    """ids [B, L]; mask None (all attend all) or [B, 1, L, L] 0/1."""
    sd = {k: v.double() for k, v in sd.items()}
    nh, nkv, hd, rot = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
        cfg["rotary_dim"],
    )
    eps = cfg["rms_norm_eps"]
    batch, length = ids.shape
    out = torch.zeros(batch, length, cfg["vocab_size"], dtype=torch.float64)
    for b in range(batch):
        xs = [sd["model.word_embeddings.weight"][int(t)].clone() for t in ids[b]]
        for li in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{li}."
            qs, ks, vs = [], [], []
            for pos, x in enumerate(xs):
                hx = _rms(x, sd[p + "input_layernorm.weight"], eps)
                qkv = sd[p + "attention.query_key_value.weight"] @ hx
                qkv = qkv + sd.get(p + "attention.query_key_value.bias", 0.0)
                heads = qkv.view(nh + 2 * nkv, hd)
                qs.append(
                    [
                        _rope(
                            _rms(heads[i], sd[p + "attention.query_layernorm.weight"], eps),
                            pos,
                            rot,
                            cfg["rope_theta"],
                        )
                        for i in range(nh)
                    ]
                )
                ks.append(
                    [
                        _rope(
                            _rms(heads[nh + i], sd[p + "attention.key_layernorm.weight"], eps),
                            pos,
                            rot,
                            cfg["rope_theta"],
                        )
                        for i in range(nkv)
                    ]
                )
                vs.append([heads[nh + nkv + i] for i in range(nkv)])
            new_xs = []
            for qpos, x in enumerate(xs):
                allowed = [j for j in range(length) if mask is None or mask[b, 0, qpos, j]]
                heads_out = []
                for i in range(nh):
                    kv = i // (nh // nkv)
                    att = [float(qs[qpos][i] @ ks[j][kv]) / math.sqrt(hd) for j in allowed]
                    top = max(att)
                    wts = [math.exp(a - top) for a in att]
                    heads_out.append(sum(w / sum(wts) * vs[j][kv] for w, j in zip(wts, allowed)))
                attn = sd[p + "attention.dense.weight"] @ torch.cat(heads_out) + sd.get(
                    p + "attention.dense.bias", 0.0
                )
                x = x + attn
                hx = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
                if li < cfg["first_k_dense_replace"]:
                    x = x + _swiglu(hx, sd, p + "mlp.")
                else:
                    for j, weight in _route(hx, sd, p + "mlp.", cfg):
                        x = x + weight * _swiglu(hx, sd, p + f"mlp.experts.{j}.")
                    if cfg.get("num_shared_experts"):
                        x = x + _swiglu(hx, sd, p + "mlp.shared_experts.")
                new_xs.append(x)
            xs = new_xs
        for pos, x in enumerate(xs):
            out[b, pos] = sd["lm_head.weight"] @ _rms(x, sd["model.norm.weight"], eps)
    return out


def block_mask(batch: int, length: int, block: int) -> torch.Tensor:
    """The published block-causal 0/1 mask: q may attend k iff block(k) <= block(q)."""
    blocks = torch.arange(length) // block
    return (blocks[None, :] <= blocks[:, None]).float().expand(batch, 1, length, length)


def _model(cfg: dict, seed: int = 0) -> tuple[LLaDA2MoeModelLM, dict]:
    sd = random_weights(cfg, seed)
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**cfg)).eval()
    model.load_state_dict(sd, strict=True)
    return model, sd


# ---- tests ----


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("masked", [False, True], ids=["bidirectional", "block_mask"])
def test_logits_equal_the_naive_reference(variant, masked):
    cfg = {**BASE, **VARIANTS[variant]}
    model, sd = _model(cfg, seed=len(variant))
    ids = torch.randint(0, cfg["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    mask = block_mask(2, 7, 3) if masked else None
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours.double(), reference_logits(sd, cfg, ids, mask), atol=1e-4, rtol=0)


def test_block_mask_changes_the_logits_and_2d_padding_mask_is_honoured():
    model, _ = _model(BASE)
    ids = torch.randint(0, BASE["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        blocked = model(ids, attention_mask=block_mask(1, 6, 2)).logits
        ones = model(ids, attention_mask=torch.ones(1, 6, dtype=torch.long)).logits
        padded = model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).logits
        short = model(ids[:, :4]).logits
        first_block = model(ids[:, :2]).logits
    torch.testing.assert_close(ones, full)
    torch.testing.assert_close(padded[:, :4], short, atol=1e-5, rtol=0)
    assert not torch.allclose(blocked[:, :4], full[:, :4], atol=1e-3)
    torch.testing.assert_close(blocked[:, :2], first_block, atol=1e-5, rtol=0)  # block 0 sees only itself


def test_the_published_additive_mask_reads_like_the_0_1_mask():
    """The published ``generate`` passes its block mask additive (0 = attend, -inf = blocked, bf16);
    read as 0/1 it would be inverted."""
    model, _ = _model(BASE)
    ids = torch.randint(0, BASE["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(4))
    allowed = block_mask(2, 7, 3)
    additive = torch.where(allowed > 0, 0.0, float("-inf"))
    with torch.no_grad():
        want = model(ids, attention_mask=allowed).logits
        for mask in (additive, additive.bfloat16(), additive.clamp(min=torch.finfo(torch.float32).min)):
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, want)
        torch.testing.assert_close(model(ids, attention_mask=allowed.bool()).logits, want)
        with pytest.raises(ValueError, match="mixes positive and negative"):
            model(ids, attention_mask=allowed - 0.5)


def test_kv_cache_of_finished_blocks_equals_the_full_pass():
    model, _ = _model(BASE)
    ids = torch.randint(0, BASE["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    mask = block_mask(2, 9, 3)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        first = model(ids[:, :6], attention_mask=mask[:, :, :6, :6], use_cache=True)
        rest = model(ids[:, 6:], attention_mask=mask[:, :, 6:, :], past_key_values=first.past_key_values)
    assert len(first.past_key_values) == BASE["num_hidden_layers"]
    torch.testing.assert_close(first.logits, full[:, :6], atol=1e-5, rtol=0)
    torch.testing.assert_close(rest.logits, full[:, 6:], atol=1e-5, rtol=0)


def test_router_losses_are_reported_from_chosen_experts():
    model, _ = _model(BASE)
    out = model(torch.randint(0, BASE["vocab_size"], (2, 5)), output_router_logits=True)
    moe_layers = BASE["num_hidden_layers"] - BASE["first_k_dense_replace"]
    assert len(out.router_logits) == len(out.router_experts) == moe_layers
    assert out.router_experts[0].shape == (10, BASE["num_experts_per_tok"])
    assert out.aux_loss.item() > 0 and out.z_loss.item() > 0


def _published_config(cfg: dict) -> dict:
    """A config.json as the published LLaDA2.0-mini writes it: no mask/EOS id, unused knobs."""
    fields = {k: v for k, v in cfg.items() if k not in ("mask_token_id", "eos_token_id")}
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "auto_map": {},
        "hidden_act": "silu",
        "router_dtype": "fp32",
        "use_qkv_bias": False,
        "use_bias": False,
        "use_rmsnorm": True,
        "use_qk_norm": True,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "sliding_window": 4096,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "norm_head": False,
        "norm_softmax": False,
        "embedding_dropout": 0.0,
        "output_dropout": 0.0,
        "using_split_qkv_in_self_attention": False,
        **fields,
    }


def test_hand_written_published_directory_loads_and_saves_exactly_the_published_keys(tmp_path):
    cfg = {**BASE, "vocab_size": 157184, "pad_token_id": 156892}  # the real vocab holds the default ids
    src = tmp_path / "published"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_published_config(cfg)))
    sd = random_weights(cfg, seed=5)
    save_file(sd, str(src / "model.safetensors"))

    config = AutoConfig.from_pretrained(src)
    assert isinstance(config, LLaDA2MoeConfig)
    assert (config.mask_token_id, config.eos_token_id) == (156895, 156892)  # family defaults
    model = AutoModelForMaskedLM.from_pretrained(src)
    assert isinstance(model, LLaDA2MoeModelLM)
    assert (model.config.mask_token_id, model.config.eos_token_id) == (156895, 156892)
    ids = torch.randint(0, cfg["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = model(ids).logits
        hidden = AutoModel.from_pretrained(src)(ids).last_hidden_state
    torch.testing.assert_close(ours.double(), reference_logits(sd, cfg, ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(model.lm_head(hidden), ours)

    out = tmp_path / "saved"
    model.save_pretrained(out, max_shard_size="64KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(published_layout(cfg))
    for key, shape in published_layout(cfg).items():
        with safe_open(str(out / index["weight_map"][key]), framework="pt") as f:
            assert tuple(f.get_slice(key).get_shape()) == shape, key
    assert json.loads((out / "config.json").read_text())["model_type"] == "llada2_moe"
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForMaskedLM.from_pretrained(out)(ids).logits, ours)
        bf16 = AutoModelForMaskedLM.from_pretrained(out, dtype=torch.bfloat16)(ids).logits
    assert bf16.dtype == torch.bfloat16 and bool(bf16.isfinite().all())


def test_mask_and_eos_ids_come_from_the_tokenizer_files(tmp_path):
    from diffmoe.model.checkpoint import load_config

    cfg = {**BASE, "vocab_size": 157184, "pad_token_id": 156000}
    (tmp_path / "config.json").write_text(json.dumps(_published_config(cfg)))  # no mask/EOS id
    save_file(random_weights(cfg, seed=7), str(tmp_path / "model.safetensors"))
    tokens = {"156001": {"content": "<|mask|>"}, "156002": {"content": "<|endoftext|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": tokens}))
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert (loaded.config.mask_token_id, loaded.config.eos_token_id) == (156001, 156002)
    config = load_config(tmp_path)
    assert (config.mask_token_id, config.eos_token_id) == (156001, 156002)
    (tmp_path / "config.json").write_text(json.dumps({**_published_config(cfg), "mask_token_id": 5}))
    assert load_config(tmp_path).mask_token_id == 5  # config.json wins
    assert AutoModelForMaskedLM.from_pretrained(tmp_path).config.mask_token_id == 5


def test_wrong_family_and_bad_config_fail_clearly(tmp_path):
    from diffmoe.model import LLaDAMoEModelLM

    model, _ = _model(BASE)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="llada2_moe"):
        LLaDAMoEModelLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rotary_dim"):
        LLaDA2MoeConfig(**{**BASE, "rotary_dim": 6})
    with pytest.raises(ValueError, match="topk_group"):
        LLaDA2MoeConfig(**{**BASE, "topk_group": 5})
    with pytest.raises(ValueError, match="router_dtype"):
        LLaDA2MoeConfig(**{**BASE, "router_dtype": "bf16"})


def test_named_sizes():
    tiny = LLaDA2MoeModelLM(llada2_named_config("llada2-tiny")).eval()
    with torch.no_grad():
        assert tiny(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 1024)
    with torch.device("meta"):
        mini = LLaDA2MoeModelLM(llada2_named_config("llada2-mini"))
    counts = count_parameters(mini)
    assert 15.5e9 < counts["total"] < 16.8e9  # "16B total"
    assert 1.3e9 < counts["active_with_embedding"] < 1.5e9  # "1.4B active"
    assert 0.7e9 < counts["active"] - mini.lm_head.weight.numel() < 0.85e9  # Ling-mini: 789M non-embedding
    with pytest.raises(KeyError, match="llada2-mini"):
        llada2_named_config("llada2-huge")


def test_an_unsupported_rope_scaling_fails_when_the_model_is_built():
    """Before any weights load, not at the first forward."""
    with pytest.raises(NotImplementedError, match="'yarn'"):
        LLaDA2MoeModelLM(LLaDA2MoeConfig(**BASE, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    LLaDA2MoeModelLM(LLaDA2MoeConfig(**BASE, rope_scaling={"rope_type": "linear", "factor": 2.0}))
