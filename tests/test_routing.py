"""Routing rules seen through the layers: top-p properties, capacity, balance loss, padding (methods.md §1, §5, §6)."""

import pytest
import torch
from layer_helpers import HIDDEN, as_dict, assert_rel_close, make_inputs, make_layer
from references import capacity_keep, expert_ffn

# ------------------------------------------------------------------------------------ 5. top-p


def _chosen(index_row, num_experts):
    return [e for e in index_row.tolist() if e < num_experts]


@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("top_p", [0.1, 0.4, 0.75, 0.95])
def test_top_p_selection_properties(num_experts, top_p):
    layer, _, _ = make_layer("dynamic", num_experts=num_experts, router_top_p=top_p, dtype=torch.float32)
    torch.manual_seed(3)
    x = torch.randn(4, 32, HIDDEN)
    out = layer(x)
    probs = out.router_logits.softmax(-1)
    index, weights = layer.select(probs)
    assert index.shape == weights.shape
    counts = []
    for t in range(probs.shape[0]):
        chosen = _chosen(index[t], num_experts)
        n = len(chosen)
        counts.append(n)
        assert 1 <= n <= num_experts
        assert len(set(chosen)) == n
        # sentinel slots: index E, weight 0, and only after the real slots
        assert index[t, :n].lt(num_experts).all() and index[t, n:].eq(num_experts).all()
        assert weights[t, n:].eq(0).all()
        # weights are the raw (unnormalised) probabilities of the selected experts
        assert torch.equal(weights[t, :n], probs[t, chosen])
        # the selected experts are the n most probable ones
        unchosen = [e for e in range(num_experts) if e not in chosen]
        if unchosen:
            assert probs[t, chosen].min() >= probs[t, unchosen].max()
        # kept mass > p unless all E are kept; one fewer expert would not exceed p (shortest prefix)
        mass = probs[t, chosen].double().sum().item()
        if n < num_experts:
            assert mass > top_p
        if n > 1:
            assert mass - probs[t, chosen].double().min().item() <= top_p + 1e-6
    assert out.mean_experts_per_token.item() == pytest.approx(sum(counts) / len(counts), abs=1e-6)
    if top_p >= 0.75:
        assert max(counts) > 1


@pytest.mark.parametrize("num_experts,top_p,expected", [(4, 0.5, 3), (4, 0.75, 4), (8, 0.25, 3), (8, 0.125, 2)])
def test_top_p_threshold_is_strict(num_experts, top_p, expected):
    """Uniform P = 1/E (exact in binary): a prefix whose mass EQUALS p is not enough, the next expert is needed."""
    layer, _, _ = make_layer("dynamic", num_experts=num_experts, router_top_p=top_p, dtype=torch.float32)
    with torch.no_grad():
        layer.router.weight.zero_()
    x, mask = make_inputs(dtype=torch.float32)
    out = layer(x, mask)
    index, weights = layer.select(out.router_logits.softmax(-1))
    assert ((index < num_experts).sum(-1) == expected).all()
    assert out.mean_experts_per_token.item() == expected
    assert torch.equal(weights[:, :expected], torch.full((index.shape[0], expected), 1.0 / num_experts))


def test_router_max_experts_caps_the_count():
    capped, _, _ = make_layer("dynamic", num_experts=8, router_top_p=0.9, router_max_experts=2, dtype=torch.float32)
    free, _, _ = make_layer("dynamic", num_experts=8, router_top_p=0.9, dtype=torch.float32)
    free.load_state_dict(capped.state_dict())
    torch.manual_seed(4)
    x = torch.randn(2, 16, HIDDEN)
    probs = free(x).router_logits.softmax(-1)
    free_counts = [len(_chosen(r, 8)) for r in free.select(probs)[0]]
    capped_counts = [len(_chosen(r, 8)) for r in capped.select(probs)[0]]
    assert max(free_counts) > 2
    assert capped_counts == [min(n, 2) for n in free_counts]
    assert capped(x).mean_experts_per_token.item() == pytest.approx(sum(capped_counts) / len(capped_counts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_top_p_one_keeps_every_expert(dtype):
    """p = 1.0: no prefix can exceed 1, so every token keeps all E experts (methods.md §5.1 edge case), also when
    the float cumulative sum rounds past 1.0 before the last expert (peaked routers)."""
    layer, _, _ = make_layer("dynamic", num_experts=8, router_top_p=1.0, dtype=dtype)
    with torch.no_grad():
        layer.router.weight.mul_(10.0)  # peaked softmax: logits with std ~10
    torch.manual_seed(5)
    x = torch.randn(4, 128, HIDDEN, dtype=dtype)
    out = layer(x)
    index, _ = layer.select(out.router_logits.softmax(-1))
    counts = (index < 8).sum(-1)
    assert counts.min().item() == 8, f"{int((counts < 8).sum())} of {counts.numel()} tokens kept fewer than 8 experts"
    assert out.mean_experts_per_token.item() == 8


# ------------------------------------------------------------------------------------ capacity


def test_capacity_rule_hand_example():
    """E = 2, k = 2, three tokens preferring experts 0, 0, 1; c = 2/3 -> capacity ceil(2/3 * 3 * 2 / 2) = 2.
    Rank 0: expert 0 takes tokens 0 and 1, expert 1 takes token 2. Rank 1: token 0 -> expert 1 (its 2nd slot),
    token 1 -> expert 1 (full, dropped), token 2 -> expert 0 (full, dropped)."""
    assert capacity_keep([[0, 1], [0, 1], [1, 0]], [True] * 3, 2, 2, 2 / 3) == [[True, True], [True, False],
                                                                                [True, False]]
    layer, _, act_name = make_layer("topk", num_experts=2, top_k=2, expert_capacity_factor=2 / 3,
                                    ffn_kind="plain_relu", norm_topk_prob=False)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # logit_0 = x[0], logit_1 = x[1]
        layer.router.weight[1, 1] = 1.0
    x = torch.randn(1, 3, HIDDEN, dtype=torch.float64)
    x[0, :, :2] = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.5]], dtype=torch.float64)
    out = layer(x).hidden_states[0]
    probs = (x[0, :, :2]).softmax(-1)
    f = [[expert_ffn(layer.experts, e, x[0, t], act_name) for e in range(2)] for t in range(3)]
    expected = torch.stack([
        probs[0, 0] * f[0][0] + probs[0, 1] * f[0][1],
        probs[1, 0] * f[1][0],
        probs[2, 1] * f[2][1],
    ])
    assert_rel_close(out, expected, 1e-12, "capacity hand example")


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_capacity_drops_use_real_token_count_and_ignore_padding(padded):
    """capacity counts non-padding tokens only; padding tokens' slots claim nothing and contribute nothing."""
    layer, _, act_name = make_layer("topk", num_experts=4, top_k=1, expert_capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(1.0)  # every token prefers expert 0 (inputs with positive sums below)
    x = torch.rand(1, 8, HIDDEN, dtype=torch.float64) + 0.1
    mask = torch.tensor([[0, 1, 0, 1, 1, 1, 1, 1]]) if padded else None
    out = layer(x, mask).hidden_states[0]
    real = [True] * 8 if mask is None else mask[0].bool().tolist()
    capacity = -(-sum(real) * 1 // 4)  # ceil(1.0 * T_real * k / E)
    kept = [t for t in range(8) if real[t]][:capacity]
    for t in range(8):
        if t in kept:
            assert out[t].abs().sum() > 0
        elif real[t]:
            assert out[t].abs().sum() == 0, f"token {t} should have been dropped"
        else:
            assert out[t].abs().sum() == 0, f"padding token {t} should contribute nothing under capacity"


# ------------------------------------------------------------------------------------ 7. balance loss, padding

ALL = ["topk", "hypermoe", "hyperrouter", "mh2", "mh1", "dynamic"]


def _uniform_router(layer, family):
    with torch.no_grad():
        if family == "hyperrouter":
            layer.router.hypernet[2].weight.zero_()
            layer.router.hypernet[2].bias.zero_()
        else:
            layer.router.weight.zero_()


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (8, 2), (8, 3)])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_uniform_router_gives_aux_loss_k_exactly(family, num_experts, top_k, padded):
    extra = {"router_top_p": 0.5} if family == "dynamic" else {}
    for dtype in (torch.float32, torch.float64):
        layer, _, _ = make_layer(family, num_experts=num_experts, top_k=top_k, dtype=dtype, **extra)
        _uniform_router(layer, family)
        x, mask = make_inputs(dtype=dtype, padded=padded)
        out = layer(x, mask)
        if family == "dynamic":
            # uniform P: every token keeps the same count m (smallest m with m/E > p); L_b = sum_e f_e = m
            m = next(m for m in range(1, num_experts + 1) if m / num_experts > 0.5)  # strict: E/2 + 1
            assert out.mean_experts_per_token.item() == m
            assert out.aux_loss.item() == m
        else:
            assert out.aux_loss.item() == top_k, f"{dtype}: aux_loss {out.aux_loss.item()!r} != {top_k}"


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("capacity", [None, 0.75], ids=["dropless", "capacity"])
def test_padding_tokens_change_nothing(family, capacity):
    """Losses and the real tokens' outputs with a padding mask equal those of running the real tokens alone."""
    extra = {"router_top_p": 0.5} if family == "dynamic" else {}
    layer, _, _ = make_layer(family, num_experts=4, top_k=2, expert_capacity_factor=capacity, **extra)
    x, mask = make_inputs(padded=True, seq=6)
    real = mask.bool()
    padded_out = as_dict(layer(x, mask))
    alone = as_dict(layer(x[real][None]))
    assert_rel_close(padded_out["hidden_states"][real], alone["hidden_states"][0], 1e-12, "real-token outputs")
    for key in ("aux_loss", "z_loss", "entropy_loss", "mean_experts_per_token"):
        if alone[key] is not None:
            assert_rel_close(padded_out[key], alone[key], 1e-12, key)
    # and padding content is irrelevant
    x2 = x.clone()
    x2[~real] = 5.0 * torch.randn_like(x2[~real])
    again = as_dict(layer(x2, mask))
    assert_rel_close(again["hidden_states"][real], padded_out["hidden_states"][real], 1e-12, "padding content")
    for key in ("aux_loss", "z_loss", "entropy_loss", "mean_experts_per_token"):
        if alone[key] is not None:
            assert_rel_close(again[key], padded_out[key], 1e-12, key)


def test_dynamic_capacity_ignores_padding_tokens():
    """Top-p + capacity: a padding token that would use many experts must not enlarge the real tokens' capacity.
    Real tokens are peaked (one expert each); the padding tokens are zero vectors (uniform P: 3 of 4 experts)."""
    layer, _, _ = make_layer("dynamic", num_experts=4, router_top_p=0.5, expert_capacity_factor=1.0)
    torch.manual_seed(11)
    x = 10.0 * torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    mask = torch.ones(1, 9, dtype=torch.long)
    mask[0, 4] = mask[0, 8] = 0
    x[0, 4] = x[0, 8] = 0.0
    real = mask.bool()
    with_padding = layer(x, mask)
    alone = layer(x[real][None])
    assert alone.mean_experts_per_token.item() == 1.0
    # capacity alone = ceil(1.0 * 7 * 1 / 4) = 2 and some expert is the choice of >= 3 real tokens: drops happen
    assert torch.bincount(alone.router_logits.argmax(-1), minlength=4).max() >= 3
    assert_rel_close(with_padding.hidden_states[real], alone.hidden_states[0], 1e-12, "real-token outputs")
