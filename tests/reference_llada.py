"""A deliberately naive LLaDA-MoE forward for parity tests: float64, per-token loops, no shared code.

Works directly from a published-layout state dict (``model.layers.{i}.mlp.experts.{j}...``) and
a plain config dict, so it checks both the math and the key layout of ``diffmoe.model``.
"""

from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    return x / math.sqrt(float((x * x).mean()) + eps) * w


def _swiglu(x, gate, up, down):
    g = gate @ x
    return down @ (g / (1 + torch.exp(-g)) * (up @ x))


def _rope(vec, pos, rot_dim, theta):
    out = vec.clone()
    half = rot_dim // 2
    for i in range(half):
        freq = 1.0 / theta ** (2 * i / rot_dim)
        c, s = math.cos(pos * freq), math.sin(pos * freq)
        a, b = vec[i], vec[i + half]
        out[i] = a * c - b * s
        out[i + half] = b * c + a * s
    return out


def reference_logits(sd: dict, cfg: dict, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None):
    sd = {k: v.double() for k, v in sd.items()}
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    rot_dim = int(hd * cfg.get("partial_rotary_factor", 1.0)) // 2 * 2
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    k_top, n_exp = cfg["num_experts_per_tok"], cfg["num_experts"]
    freq = cfg.get("moe_layer_freq") or [1] * cfg["num_hidden_layers"]
    batch, length = input_ids.shape
    out = torch.zeros(batch, length, sd["lm_head.weight"].shape[0], dtype=torch.float64)
    for b in range(batch):
        xs = [sd["model.embed_tokens.weight"][int(t)].clone() for t in input_ids[b]]
        for li in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{li}."

            def w(name, p=p):
                return sd[p + name]

            def bias(name, p=p):
                return sd.get(p + name, 0.0)

            normed = [_rms(x, w("input_layernorm.weight"), eps) for x in xs]
            qs, ks, vs = [], [], []
            for pos, x in enumerate(normed):
                q = (w("self_attn.q_proj.weight") @ x + bias("self_attn.q_proj.bias")).view(nh, hd)
                k = (w("self_attn.k_proj.weight") @ x + bias("self_attn.k_proj.bias")).view(nkv, hd)
                v = (w("self_attn.v_proj.weight") @ x + bias("self_attn.v_proj.bias")).view(nkv, hd)
                if cfg.get("qk_layernorm", True):
                    q = torch.stack([_rms(q[h], w("self_attn.q_norm.weight"), eps) for h in range(nh)])
                    k = torch.stack([_rms(k[h], w("self_attn.k_norm.weight"), eps) for h in range(nkv)])
                if cfg.get("clip_qkv") is not None:  # after the norms, as the published code clips
                    c = cfg["clip_qkv"]
                    q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
                qs.append(torch.stack([_rope(q[h], pos, rot_dim, theta) for h in range(nh)]))
                ks.append(torch.stack([_rope(k[h], pos, rot_dim, theta) for h in range(nkv)]))
                vs.append(v)
            new_xs = []
            for i in range(length):
                heads = []
                for h in range(nh):
                    kv_h = h // (nh // nkv)
                    scores, values = [], []
                    for j in range(length):
                        if key_mask is not None and not key_mask[b, j] and j != i:
                            continue
                        scores.append(float(qs[i][h] @ ks[j][kv_h]) / math.sqrt(hd))
                        values.append(vs[j][kv_h])
                    mx = max(scores)
                    ex = [math.exp(s - mx) for s in scores]
                    heads.append(sum(e / sum(ex) * v for e, v in zip(ex, values)))
                attn = w("self_attn.o_proj.weight") @ torch.cat(heads) + bias("self_attn.o_proj.bias")
                x = xs[i] + attn
                hn = _rms(x, w("post_attention_layernorm.weight"), eps)
                if freq[li]:
                    logits = w("mlp.gate.weight") @ hn
                    probs = torch.softmax(logits, 0)
                    choice = probs + sd[p + "mlp.expert_bias"] if p + "mlp.expert_bias" in sd else probs
                    chosen = sorted(range(n_exp), key=lambda e, c=choice: -float(c[e]))[:k_top]
                    weights = [float(choice[e]) for e in chosen]  # published: mixed with the bias added
                    if cfg.get("norm_topk_prob"):
                        weights = [wt / sum(weights) for wt in weights]
                    mlp = sum(
                        wt
                        * _swiglu(
                            hn,
                            w(f"mlp.experts.{e}.gate_proj.weight"),
                            w(f"mlp.experts.{e}.up_proj.weight"),
                            w(f"mlp.experts.{e}.down_proj.weight"),
                        )
                        for wt, e in zip(weights, chosen)
                    )
                else:
                    mlp = _swiglu(
                        hn, w("mlp.gate_proj.weight"), w("mlp.up_proj.weight"), w("mlp.down_proj.weight")
                    )
                if p + "shared_expert.gate_proj.weight" in sd:
                    mlp = mlp + _swiglu(
                        hn,
                        w("shared_expert.gate_proj.weight"),
                        w("shared_expert.up_proj.weight"),
                        w("shared_expert.down_proj.weight"),
                    )
                new_xs.append(x + mlp)
            xs = new_xs
        for i, x in enumerate(xs):
            out[b, i] = sd["lm_head.weight"] @ _rms(x, sd["model.norm.weight"], eps)
    return out


def published_layout(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the published LLaDA-MoE state dict, written out from the model card layout."""
    v, h = cfg["vocab_size"], cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    e, width = cfg["num_experts"], cfg["expert_intermediate_size"]
    freq = cfg.get("moe_layer_freq") or [1] * cfg["num_hidden_layers"]
    keys = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        keys.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (nh * hd, h),
                p + "self_attn.k_proj.weight": (nkv * hd, h),
                p + "self_attn.v_proj.weight": (nkv * hd, h),
                p + "self_attn.o_proj.weight": (h, nh * hd),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
            }
        )
        if freq[i]:
            keys[p + "mlp.gate.weight"] = (e, h)
            for j in range(e):
                keys[p + f"mlp.experts.{j}.gate_proj.weight"] = (width, h)
                keys[p + f"mlp.experts.{j}.up_proj.weight"] = (width, h)
                keys[p + f"mlp.experts.{j}.down_proj.weight"] = (h, width)
            if cfg.get("moe_router_enable_expert_bias"):
                keys[p + "mlp.expert_bias"] = (e,)
        else:
            d = cfg["dense_intermediate_size"]
            keys.update(
                {
                    p + "mlp.gate_proj.weight": (d, h),
                    p + "mlp.up_proj.weight": (d, h),
                    p + "mlp.down_proj.weight": (h, d),
                }
            )
        if cfg.get("shared_expert_intermediate_size") and freq[i]:  # MoE layers only
            s = cfg["shared_expert_intermediate_size"]
            keys.update(
                {
                    p + "shared_expert.gate_proj.weight": (s, h),
                    p + "shared_expert.up_proj.weight": (s, h),
                    p + "shared_expert.down_proj.weight": (h, s),
                }
            )
    return keys
