"""Every MoE family against its naive float64 per-token reference (outputs, losses, all gradients), plus the
family-specific checks of methods.md §6."""

import copy
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layer_helpers import (
    FAMILIES,
    FFN_KINDS,
    HIDDEN,
    INTERMEDIATE,
    as_dict,
    assert_rel_close,
    grads,
    make_config,
    make_inputs,
    make_layer,
    scalar_loss,
    trainable,
)
from references import expert_ffn, reference_layer

from hf_moe import FfnSpec, HyperRouterLayer, TopKMoeLayer

TOL = 1e-6


def check_against_reference(layer, generator, act_name, family, x, mask, tol=TOL):
    """Forward values and gradients (input + every trainable parameter) of `layer` vs the naive reference."""
    ref_family = FAMILIES[family][0]
    x = x.detach().requires_grad_(True)
    got = as_dict(layer(x, mask))
    ref = reference_layer(layer, ref_family, x, mask, act_name, generator)

    real = ref["real_tokens"].reshape(x.shape[:2])
    assert got["hidden_states"].shape == x.shape
    assert_rel_close(got["hidden_states"][real], ref["hidden_states"][real], tol, "hidden_states (real tokens)")
    assert_rel_close(got["router_logits"], ref["router_logits"], tol, "router_logits")
    for key in ("aux_loss", "z_loss", "entropy_loss", "expert_load", "mean_experts_per_token"):
        assert_rel_close(got[key], ref[key], tol, key)

    torch.manual_seed(123)
    probe = torch.randn_like(x)
    named = trainable(layer, generator)
    tensors = [x] + [p for _, p in named]
    g_got = grads(scalar_loss(got, probe, mask), tensors)
    g_ref = grads(scalar_loss(ref, probe, mask), tensors)
    for name, a, b in zip(["input"] + [n for n, _ in named], g_got, g_ref):
        assert_rel_close(a, b, tol, f"grad {name}")
    return got, ref


# ------------------------------------------------------------------------------------ 1. exactness grid

KIND_NAMES = list(FFN_KINDS)
GRID = []
for family in ("topk", "hypermoe", "hyperrouter", "mh2", "mh1", "dynamic"):
    selections = (0.4, 0.75) if family == "dynamic" else (1, 2)
    for num_experts, selection, ffn_kind, padded in itertools.product((4, 8), selections, KIND_NAMES, (False, True)):
        label = f"p{selection}" if family == "dynamic" else f"k{selection}"
        GRID.append(
            pytest.param(
                family, num_experts, selection, ffn_kind, padded,
                id=f"{family}-E{num_experts}-{label}-{ffn_kind}-{'pad' if padded else 'nopad'}",
            )
        )


@pytest.mark.parametrize("family,num_experts,selection,ffn_kind,padded", GRID)
def test_layer_matches_naive_reference(family, num_experts, selection, ffn_kind, padded):
    if family == "dynamic":
        layer, gen, act_name = make_layer(family, num_experts=num_experts, ffn_kind=ffn_kind, router_top_p=selection)
    else:
        layer, gen, act_name = make_layer(family, num_experts=num_experts, top_k=selection, ffn_kind=ffn_kind)
    x, mask = make_inputs(padded=padded)
    got, ref = check_against_reference(layer, gen, act_name, family, x, mask)
    if family == "mh2":
        assert got["router_logits"].shape == (x.shape[0] * x.shape[1] * 2, num_experts)  # h sub-tokens per token
    if family == "dynamic" and selection == 0.75:
        assert max(len(s) for s in ref["selections"]) > 1, "top-p should pick several experts for some tokens"


DYNAMIC_VARIANTS = [
    pytest.param({"router_top_p": 0.6, "router_max_experts": 2}, id="p0.6-max2"),
    pytest.param({"router_top_p": 0.5, "norm_topk_prob": True}, id="p0.5-renormalised"),
    pytest.param({"router_top_p": 1.0}, id="p1.0-all-experts"),
    pytest.param({"router_top_p": 0.05}, id="p0.05-single-expert"),
]


@pytest.mark.parametrize("overrides", DYNAMIC_VARIANTS)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_dynamic_variants_match_reference(overrides, padded):
    layer, gen, act_name = make_layer("dynamic", num_experts=8, ffn_kind="biased_gelu", **overrides)
    x, mask = make_inputs(padded=padded)
    check_against_reference(layer, gen, act_name, "dynamic", x, mask)


@pytest.mark.parametrize("family", ["topk", "hypermoe", "hyperrouter", "mh2"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_capacity_drops_match_reference_rule(family, padded):
    """capacity = ceil(c * T_real * k / E); first choices before second choices, token order within a rank;
    padding claims nothing; HyperMoE's unselected set is taken before the drop; aux loss from pre-drop choice."""
    kind = {"topk": "gated_silu", "hypermoe": "biased_gelu", "hyperrouter": "plain_relu", "mh2": "gated_silu"}[family]
    layer, gen, act_name = make_layer(family, num_experts=4, top_k=2, ffn_kind=kind, expert_capacity_factor=0.6)
    x, mask = make_inputs(padded=padded, seq=6)
    _, ref = check_against_reference(layer, gen, act_name, family, x, mask)
    real = ref["real_tokens"].repeat_interleave(2 if family == "mh2" else 1).tolist()
    dropped = sum(not kept for keep_row, r in zip(ref["keep"], real) if r for kept in keep_row)
    assert dropped > 0, "the capacity factor should force drops in this test"


def test_hypermoe_with_default_dimensions_matches_reference():
    """The official dimensions (128/10/128, r = 64), not only the shrunken test ones."""
    layer, gen, act_name = make_layer(
        "hypermoe", num_experts=8, top_k=2, ffn_kind="gated_silu",
        hyper_embedding_dim=128, hyper_layer_embedding_dim=10, hyper_hidden_dim=128, hyper_adapter_rank=64,
    )
    x, mask = make_inputs(padded=True)
    check_against_reference(layer, gen, act_name, "hypermoe", x, mask)


def test_mh_moe_expert_width_and_intermediate():
    """MH-MoE experts act on d/h sub-tokens with moe_intermediate_size (or the FFN's) inner width."""
    layer, gen, act_name = make_layer("mh2", num_experts=4, top_k=2, moe_intermediate_size=24, moe_num_heads=4)
    assert layer.experts.gate_up_proj.shape == (4, 2 * 24, HIDDEN // 4)
    assert layer.experts.down_proj.shape == (4, HIDDEN // 4, 24)
    assert layer.router.weight.shape == (4, HIDDEN // 4)
    assert layer.head_proj.weight.shape == (HIDDEN, HIDDEN) and layer.merge_proj.weight.shape == (HIDDEN, HIDDEN)
    x, mask = make_inputs(padded=True)
    check_against_reference(layer, gen, act_name, "mh2", x, mask)
    layer1, _, _ = make_layer("mh1", num_experts=4, top_k=2)
    assert not hasattr(layer1, "head_proj") and not hasattr(layer1, "merge_proj")
    assert layer1.experts.down_proj.shape == (4, HIDDEN, INTERMEDIATE)


# ------------------------------------------------------------------------------------ HyperMoE specifics


def test_hypermoe_generates_once_per_selection_set():
    """§2.4: one generator row per distinct selected set in the batch (G <= C(E, k)), and the result equals
    per-token generation (the reference generates per token; see the grid above)."""
    layer, gen, _ = make_layer("hypermoe", num_experts=4, top_k=2)
    x = torch.randn(3, 12, HIDDEN, dtype=torch.float64)
    rows = []
    handle = gen.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    try:
        out = layer(x)
    finally:
        handle.remove()
    probs = out.router_logits.softmax(-1)
    distinct_sets = {tuple(sorted(s)) for s in probs.topk(2, dim=-1).indices.tolist()}
    assert rows == [len(distinct_sets)]
    assert len(distinct_sets) <= math.comb(4, 2)
    assert len(distinct_sets) > 1


def test_hypermoe_tiny_init_is_plain_moe_at_step_zero():
    """§6: with the official tiny generator init (and official dimensions), HyperMoE ≈ the plain top-k MoE,
    ≈1e-3 relative for experts whose output is O(1) (an upcycled FFN; here initializer_range 0.2)."""
    layer, gen, _ = make_layer("hypermoe", num_experts=8, top_k=2, dtype=torch.float32, big_hyper_init=False,
                               hyper_embedding_dim=128, hyper_layer_embedding_dim=10, hyper_hidden_dim=128,
                               hyper_adapter_rank=64)
    plain = TopKMoeLayer(layer.config, FfnSpec(HIDDEN, INTERMEDIATE, "silu", True, False), 1)
    missing, _ = plain.load_state_dict(layer.state_dict(), strict=False)
    assert missing == []
    x, mask = make_inputs(dtype=torch.float32)
    with torch.no_grad():
        a, b = layer(x, mask).hidden_states, plain(x, mask).hidden_states
    err = ((a - b).norm() / b.norm()).item()
    assert err < 1e-3 and err > 0


HYPERMOE_MEMORY_SCRIPT = r"""
import resource, torch
from hf_moe import FfnSpec, HyperExpertGenerator, HyperMoeConfig, HyperMoeLayer
torch.manual_seed(0)
torch.set_num_threads(2)
d, r, tokens = 256, 64, 16384
config = HyperMoeConfig(
    text_config={"model_type": "llama", "hidden_size": d, "intermediate_size": 512, "num_hidden_layers": 2,
                 "num_attention_heads": 4},
    num_experts=8, num_experts_per_tok=2, hyper_adapter_rank=r, experts_implementation="eager",
)
generator = HyperExpertGenerator(config, d, 2)
layer = HyperMoeLayer(config, FfnSpec(d, 128, "relu", False, False), 1, generator).eval()
x = torch.randn(tokens, d)
with torch.no_grad():
    layer(x[:256])  # warm-up: allocator and kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    out = layer(x).hidden_states
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert out.shape == (tokens, d) and bool(torch.isfinite(out).all())
print((after - before) * 1024)
"""


def test_hypermoe_16k_token_forward_memory_is_not_per_token():
    """§2.4: per-token generation would materialise tokens*d*r floats twice (W_down and W_up)."""
    repo_root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", HYPERMOE_MEMORY_SCRIPT], capture_output=True, text=True, timeout=300, cwd=repo_root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.strip().splitlines()[-1])
    tokens, d, r = 16384, 256, 64
    one_tensor = tokens * d * r * 4
    mb, naive_mb = growth / 2**20, 2 * one_tensor / 2**20
    print(f"\nHyperMoE 16k-token forward: peak RSS growth {mb:.0f} MB vs {naive_mb:.0f} MB per-token")
    assert growth < 0.25 * one_tensor


# ------------------------------------------------------------------------------------ HyperRouter specifics


def test_hyperrouter_adamw_step_changes_only_the_embedding():
    layer, _, _ = make_layer("hyperrouter", num_experts=4, top_k=2, dtype=torch.float32)
    hypernet = {n: p.detach().clone() for n, p in layer.router.hypernet.state_dict().items()}
    embedding = layer.router.router_embedding.detach().clone()
    experts = {n: p.detach().clone() for n, p in layer.experts.named_parameters()}
    assert len(hypernet) == 4
    assert not any(p.requires_grad for p in layer.router.hypernet.state_dict(keep_vars=True).values())
    assert layer.router.router_embedding.requires_grad

    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x, mask = make_inputs(dtype=torch.float32)
    out = layer(x, mask)
    loss = out.hidden_states.pow(2).mean() + out.aux_loss + out.z_loss
    loss.backward()
    optimizer.step()

    for name, param in layer.router.hypernet.state_dict(keep_vars=True).items():
        assert torch.equal(param, hypernet[name]), f"hypernet.{name} changed"
        assert param.grad is None
    assert not torch.equal(layer.router.router_embedding, embedding)
    assert any(not torch.equal(p, experts[n]) for n, p in layer.experts.named_parameters())


def test_hyperrouter_gate_is_softmax_over_selected_whatever_norm_topk_prob_says():
    """§3: HyperRouter's gate is a softmax over the k selected logits. For k = 1 that is weight 1, also when the
    config leaves norm_topk_prob unset (None, the shared-field default meaning 'off for k = 1')."""
    torch.manual_seed(0)
    config = make_config("hyperrouter", num_experts=4, top_k=1, norm_topk_prob=None)
    layer = HyperRouterLayer(config, FfnSpec(HIDDEN, INTERMEDIATE, "relu", False, False), 0).double()
    x, mask = make_inputs(padded=True)
    check_against_reference(layer, None, "relu", "hyperrouter", x, mask)


def test_hyperrouter_caches_its_router_at_inference_and_follows_every_change():
    """At inference the generated router is made once and reused until e, the hypernetwork or the dtype changes
    (or train()/eval() after a `.data` edit); logits always equal W_r x + b_r written out from the current tensors."""
    layer, _, _ = make_layer("hyperrouter", num_experts=4, top_k=2)
    gate = layer.router.eval()
    generated = []
    gate.hypernet.register_forward_hook(lambda module, args, output: generated.append(1))
    x = make_inputs(padded=False)[0].reshape(-1, HIDDEN)

    def reference():  # theta = W2 relu(W1 e + b1) + b2, rows [W_r | b_r] per expert
        (w1, b1), (w2, b2) = [(lin.weight, lin.bias) for lin in (gate.hypernet[0], gate.hypernet[2])]
        theta = (w2 @ torch.relu(w1 @ gate.router_embedding + b1) + b2).view(4, HIDDEN + 1)
        return x @ theta[:, :-1].T + theta[:, -1]

    def matches():  # float64: rounding of a d- and an H-term sum
        assert_rel_close(gate(x), reference(), 1e-12, "router logits")
        return True

    with torch.no_grad():
        for _ in range(3):
            assert matches()
        assert len(generated) == 1
        gate.router_embedding.add_(0.5)  # an optimizer step: in-place, the version moves
        assert matches() and len(generated) == 2
        gate.hypernet[2].bias.mul_(2.0)  # a buffer changed in place
        assert matches() and len(generated) == 3
        assert gate(x.float()).dtype == torch.float32 and len(generated) == 4  # another dtype: its own router
        gate.router_embedding.data = gate.router_embedding.data * 3  # no version counter sees `.data`...
        gate.train().eval()  # ...train()/eval() refreshes
        assert matches() and len(generated) == 5
    assert copy.deepcopy(gate).__dict__["router_cache"] is None
    assert matches()  # with gradients on it generates afresh
    assert len(generated) == 6


# ------------------------------------------------------------------------------------ MH-MoE specifics


@pytest.mark.parametrize("ffn_kind", KIND_NAMES)
def test_mh_moe_one_head_is_the_topk_baseline(ffn_kind):
    mh, _, act_name = make_layer("mh1", num_experts=4, top_k=2, ffn_kind=ffn_kind, dtype=torch.float32)
    config = make_config("topk", num_experts=4, top_k=2)
    _, gated, bias = FFN_KINDS[ffn_kind]
    topk = TopKMoeLayer(config, FfnSpec(HIDDEN, INTERMEDIATE, act_name, gated, bias), 1)
    topk.load_state_dict(mh.state_dict())  # strict: same parameter names, nothing extra on either side
    x, mask = make_inputs(dtype=torch.float32)
    a, b = mh(x, mask), topk(x, mask)
    for key in ("hidden_states", "router_logits", "aux_loss", "z_loss"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


# ------------------------------------------------------------------------------------ 6. experts backends

BACKEND_CASES = []
for i, family in enumerate(("topk", "hypermoe", "hyperrouter", "mh2", "mh1", "dynamic")):
    for impl, capacity in itertools.product(("grouped_mm", "batched_mm"), (None, 0.6)):
        BACKEND_CASES.append(
            pytest.param(
                family, impl, capacity, KIND_NAMES[i % 3], id=f"{family}-{impl}-{'cap' if capacity else 'dropless'}"
            )
        )


@pytest.mark.parametrize("family,impl,capacity,ffn_kind", BACKEND_CASES)
def test_experts_backends_agree_with_eager(family, impl, capacity, ffn_kind):
    extra = {"router_top_p": 0.5} if family == "dynamic" else {}
    layer, gen, _ = make_layer(family, num_experts=8, top_k=2, ffn_kind=ffn_kind, dtype=torch.float32,
                               expert_capacity_factor=capacity, **extra)
    x, mask = make_inputs(dtype=torch.float32, seq=6)
    torch.manual_seed(7)
    probe = torch.randn_like(x)
    named = trainable(layer, gen)
    results = {}
    for backend in ("eager", impl):
        layer.config._experts_implementation = backend
        xi = x.clone().requires_grad_(True)
        out = as_dict(layer(xi, mask))
        tensors = [xi] + [p for _, p in named]
        results[backend] = (out, grads(scalar_loss(out, probe, mask), tensors))
    (ref_out, ref_grads), (out, got_grads) = results["eager"], results[impl]
    if family == "dynamic":
        assert out["mean_experts_per_token"] < 8  # sentinel slots are present
    for key in ("hidden_states", "aux_loss", "z_loss", "entropy_loss"):
        if ref_out[key] is not None:
            assert_rel_close(out[key], ref_out[key], 1e-5, key)
    for name, a, b in zip(["input"] + [n for n, _ in named], got_grads, ref_grads):
        assert torch.isfinite(a).all(), f"{impl}: NaN/inf in grad {name}"
        assert_rel_close(a, b, 1e-5, f"{impl} grad {name}")


@pytest.mark.parametrize("family", ["topk", "hypermoe", "hyperrouter", "mh2", "dynamic"])
@pytest.mark.parametrize("ffn_kind", KIND_NAMES)
def test_grouped_experts_path_matches_reference(family, ffn_kind):
    """In float32 with few rows per expert the default experts run as one grouped_mm call per projection (the float64
    grid above runs the per-expert loop); checked against the same float64 reference on the same weights."""
    extra = {"router_top_p": 0.5} if family == "dynamic" else {}
    layer, gen, act_name = make_layer(family, num_experts=8, ffn_kind=ffn_kind, dtype=torch.float32, **extra)
    twin, twin_gen, _ = make_layer(family, num_experts=8, ffn_kind=ffn_kind, **extra)  # same draws, in float64
    x, mask = make_inputs(dtype=torch.float32, seq=20)  # 40 tokens: more than the 28 sets, so HyperMoE groups too
    x.requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    with torch.profiler.profile() as prof:
        got = as_dict(layer(x, mask))
    calls = {event.key: event.count for event in prof.key_averages()}.get("aten::_grouped_mm", 0)
    assert calls == (4 if family == "hypermoe" else 2)  # up and down projections (+ HyperMoE's grouped adapters)
    ref = reference_layer(twin, FAMILIES[family][0], x64, mask, act_name, twin_gen)

    # float32 rounding over sums of at most HIDDEN + INTERMEDIATE + 8 terms: 2^-24 * 88 ~ 5e-6 relative
    tol = 1e-5
    real = ref["real_tokens"].reshape(x.shape[:2])
    assert_rel_close(got["hidden_states"][real], ref["hidden_states"][real].float(), tol, "hidden_states")
    torch.manual_seed(123)
    probe = torch.randn_like(x64)
    named, twin_named = trainable(layer, gen), trainable(twin, twin_gen)
    g_got = grads(scalar_loss(got, probe.float(), mask), [x] + [p for _, p in named])
    g_ref = grads(scalar_loss(ref, probe, mask), [x64] + [p for _, p in twin_named])
    for name, a, b in zip(["input"] + [n for n, _ in named], g_got, g_ref):
        assert_rel_close(a, b.float(), tol, f"grad {name}")


# ------------------------------------------------------------------------------------ misc layer behaviour


@pytest.mark.parametrize("family", ["topk", "dynamic", "hyperrouter"])
def test_identical_experts_with_renormalisation_give_the_ffn(family):
    """All experts = one FFN and weights renormalised => the layer is that FFN (float32, 1e-5)."""
    extra = {"router_top_p": 0.5, "norm_topk_prob": True} if family == "dynamic" else {}
    layer, _, act_name = make_layer(family, num_experts=8, top_k=2, ffn_kind="biased_gelu", dtype=torch.float32,
                                    **extra)
    with torch.no_grad():
        for param in layer.experts.parameters():
            param.copy_(param[0:1].expand_as(param))
    x, mask = make_inputs(dtype=torch.float32, padded=False)
    out = layer(x).hidden_states
    experts64 = copy.deepcopy(layer.experts).double()
    dense = torch.stack([expert_ffn(experts64, 0, v.double(), act_name) for v in x.reshape(-1, HIDDEN)])
    assert_rel_close(out.reshape(-1, HIDDEN), dense, 1e-5, "identical experts")


@pytest.mark.parametrize("family", ["topk", "hyperrouter", "mh2", "dynamic"])
def test_jitter_is_training_only_and_out_of_place(family):
    layer, gen, act_name = make_layer(family, num_experts=4, top_k=2, router_jitter_noise=0.3)
    x, mask = make_inputs(padded=True)
    layer.eval()
    check_against_reference(layer, gen, act_name, family, x, mask)  # eval: no noise
    layer.train()
    x_copy = x.clone()
    torch.manual_seed(5)
    a = layer(x, mask).router_logits
    assert torch.equal(x, x_copy)
    assert not torch.equal(a, reference_layer(layer, FAMILIES[family][0], x, mask, act_name)["router_logits"])


@pytest.mark.parametrize("family", ["topk", "hyperrouter", "mh2", "dynamic"])
def test_router_computes_in_float32_for_bf16_models(family):
    layer, _, _ = make_layer(family, num_experts=4, top_k=2, dtype=torch.bfloat16)
    x, mask = make_inputs(dtype=torch.bfloat16)
    out = layer(x, mask)
    assert out.hidden_states.dtype == torch.bfloat16
    assert out.router_logits.dtype == torch.float32
    assert out.aux_loss.dtype == torch.float32 and out.z_loss.dtype == torch.float32
