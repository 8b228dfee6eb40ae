"""The one router (model/router.py): every option against a plain reference, and the losses
counting the experts actually chosen."""

from __future__ import annotations

import pytest
import torch

from diffmoe.model import LLaDAMoEConfig, LLaDAMoEModelLM
from diffmoe.model.router import RouterOptions, route, router_losses, select_experts


def _old_route_tokens(cfg: LLaDAMoEConfig, logits, expert_bias=None):
    """The LLaDA-MoE routing as it was before the router module (softmax, top-k, optional renorm)."""
    scores = logits.softmax(dim=-1)
    choice = scores + expert_bias if expert_bias is not None else scores
    expert_idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, expert_idx)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return expert_idx, weights * cfg.routed_scaling_factor


def _config(**kw) -> LLaDAMoEConfig:
    base = dict(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, mask_token_id=1)
    return LLaDAMoEConfig(**{**base, **kw})


@pytest.mark.parametrize("k,norm", [(1, False), (1, True), (3, False), (3, True), (8, False)])
def test_softmax_path_is_bit_identical_to_the_old_routing(k, norm):
    cfg = _config(num_experts=8, num_experts_per_tok=k, norm_topk_prob=norm)
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(k))
    idx, w = select_experts(cfg.router_options(), logits)
    old_idx, old_w = _old_route_tokens(cfg, logits)
    assert torch.equal(idx, old_idx) and torch.equal(w, old_w)


def test_sigmoid_bias_changes_the_choice_not_the_weights():
    opts = RouterOptions(num_experts=6, top_k=2, score_function="sigmoid", expert_bias=True)
    logits = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0])
    idx, w = select_experts(opts, logits, bias)
    assert (idx == 5).any(-1).all()  # the bias forces expert 5 into every token's choice
    torch.testing.assert_close(w, logits.sigmoid().gather(1, idx), rtol=0, atol=0)  # unbiased
    plain_idx, _ = select_experts(opts, logits)
    assert not torch.equal(idx, plain_idx)
    # route() applies the bias only when the options enable it
    x, gate = torch.randn(40, 4), torch.randn(6, 4)
    off = RouterOptions(num_experts=6, top_k=2, score_function="sigmoid")
    assert torch.equal(route(off, x, gate, bias).expert_idx, route(off, x, gate).expert_idx)
    assert not torch.equal(route(opts, x, gate, bias).expert_idx, route(off, x, gate).expert_idx)


def _brute_force_group_topk(choice: torch.Tensor, n_group: int, topk_group: int, k: int):
    """Per token: rank groups by the sum of their two best scores, keep the best topk_group,
    then the k best experts inside them, by plain Python sorting."""
    e = choice.shape[-1]
    size = e // n_group
    out = []
    for row in choice.tolist():
        groups = [row[g * size : (g + 1) * size] for g in range(n_group)]
        group_score = [sum(sorted(grp, reverse=True)[:2]) for grp in groups]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [j for g in kept for j in range(g * size, (g + 1) * size)]
        out.append(set(sorted(allowed, key=lambda j: -row[j])[:k]))
    return out


@pytest.mark.parametrize(
    "score,n_group,topk_group,k", [("sigmoid", 4, 2, 3), ("sigmoid", 8, 3, 4), ("softmax", 4, 1, 2)]
)
def test_group_limited_topk_equals_brute_force(score, n_group, topk_group, k):
    e = 16
    opts = RouterOptions(
        num_experts=e, top_k=k, score_function=score, n_group=n_group, topk_group=topk_group, expert_bias=True
    )
    gen = torch.Generator().manual_seed(n_group)
    logits = torch.randn(64, e, generator=gen)
    bias = 0.3 * torch.randn(e, generator=gen)
    idx, _ = select_experts(opts, logits, bias)
    choice = (logits.sigmoid() if score == "sigmoid" else logits.softmax(-1)) + bias
    expected = _brute_force_group_topk(choice, n_group, topk_group, k)
    assert [set(r) for r in idx.tolist()] == expected
    # grouping really restricts the choice for some tokens
    ungrouped, _ = select_experts(RouterOptions(num_experts=e, top_k=k, score_function=score), logits, bias)
    assert any(set(a) != set(b) for a, b in zip(idx.tolist(), ungrouped.tolist()))


def test_renormalisation_and_scaling():
    logits = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    opts = RouterOptions(
        num_experts=8, top_k=3, score_function="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5
    )
    idx, w = select_experts(opts, logits)
    torch.testing.assert_close(w.sum(-1), torch.full((30,), 2.5))
    s = logits.sigmoid().gather(1, idx)
    torch.testing.assert_close(w, 2.5 * s / s.sum(-1, keepdim=True))
    raw = RouterOptions(num_experts=8, top_k=3, score_function="sigmoid", routed_scaling_factor=2.5)
    torch.testing.assert_close(select_experts(raw, logits)[1], 2.5 * s)


def test_losses_count_the_experts_actually_chosen():
    logits = torch.randn(20, 4, generator=torch.Generator().manual_seed(3))
    chosen = torch.zeros(20, 1, dtype=torch.long)  # every token on expert 0 (as a bias would force)
    aux, z = router_losses([logits], [chosen])
    importance = logits.softmax(-1).mean(0)
    torch.testing.assert_close(aux, 4 * importance[0])  # load = [1, 0, 0, 0]
    torch.testing.assert_close(z, torch.logsumexp(logits, -1).pow(2).mean())
    plain, _ = router_losses([logits], [logits.topk(1, -1).indices])
    assert not torch.isclose(aux, plain)


def test_model_losses_follow_bias_driven_choices():
    cfg = _config(num_experts=4, num_experts_per_tok=1, moe_router_enable_expert_bias=True)
    model = LLaDAMoEModelLM(cfg).eval()
    model.model.layers[0].mlp.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    out = model(torch.randint(0, 16, (2, 6)), output_router_logits=True)
    assert (out.router_experts[0] == 3).all()
    probs = out.router_logits[0].softmax(-1)
    torch.testing.assert_close(out.aux_loss, 4 * probs[:, 3].mean())


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(num_experts=6, router_num_group=4), "n_group"),
        (dict(num_experts=8, router_num_group=4, router_topk_group=5), "topk_group"),
        (dict(num_experts=8, num_experts_per_tok=5, router_num_group=4, router_topk_group=2), "top_k"),
        (dict(moe_router_score_function="tanh"), "score_function"),
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    ],
)
def test_bad_router_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        _config(**kw)


def test_group_options_from_the_llada_moe_config():
    opts = _config(
        num_experts=8, num_experts_per_tok=2, router_num_group=4, router_topk_group=2
    ).router_options()
    assert (opts.n_group, opts.topk_group, opts.grouped) == (4, 2, True)
    assert not _config(num_experts=8, router_num_group=4).router_options().grouped


def test_expert_load_metrics_count_the_chosen_experts():
    from diffmoe.parallel.moe import LLaDAGate
    from diffmoe.train.metrics import expert_load_metrics

    cfg = _config(hidden_size=8, num_experts=4, num_experts_per_tok=1, moe_router_enable_expert_bias=True)
    gate = LLaDAGate(cfg)
    gate.routing_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    gate.route(torch.randn(12, 8))
    assert (gate.routing.expert_idx == 2).all()
    # every token on one of four experts: max/mean load 4, whatever the plain top-k would say
    assert expert_load_metrics(gate)["moe/layer0/max_mean_load"] == 4.0
