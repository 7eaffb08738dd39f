"""Family options that reproduce the official code (issue #11; docs/hypermoe.md, docs/hyperrouter.md, docs/mh_moe.md,
each §6): every option against a port of the official formula written here, one token at a time in float64, from
the official sources quoted in the docs (never from hf_moe's code). The layers run in float32."""

import copy
import math

import models_common as models
import pytest
import torch
from layer_helpers import HIDDEN, INTERMEDIATE, make_config, make_inputs, make_layer, trainable
from references import choose_top_k, descending, expert_ffn, hyper_expert, linear, norm_rule, params_of, softmax
from torch import nn

from hf_moe import FfnSpec, MultiHeadMoeLayer
from hf_moe.modeling.hypermoe import NoisyTopKRouter
from hf_moe.modeling.mh_moe import CosineRouter, TorchInitRouter

# --------------------------------------------------------------------------------------------- shared


def as_float64(layer, generator=None):
    """A float64 copy of `layer` (and of its HyperMoE generator, which the layer holds unregistered)."""
    reference = copy.deepcopy(layer).double()
    if generator is not None:
        reference.__dict__["generator"].double()
    return reference, reference.__dict__.get("generator")


def phi(z: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF (torch.distributions.Normal(0, 1).cdf in the official code)."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Official `cv_squared`: x.var() / (x.mean() ** 2 + 1e-10), unbiased variance; 0 for one expert."""
    n = v.shape[0]
    if n == 1:
        return torch.zeros((), dtype=v.dtype)
    mean = v.sum() / n
    return ((v - mean) ** 2).sum() / (n - 1) / (mean**2 + 1e-10)


def output_loss(hidden, real, probe):
    """A scalar of the real tokens' outputs."""
    return (hidden * probe * real[..., None].to(hidden.dtype)).sum()


def compare_grads(assert_fp32_close, layer, generator, reference, ref_generator, loss, ref_loss, x, x64, depth):
    """Gradients of `loss` (float32 layer) and `ref_loss` (float64 reference) for the input and every trainable
    tensor. Where the exact gradient is 0 (renormalised top-1 weights are constant 1), float32 leaves the rounding of
    p / p, bounded on the scale of the loss's largest gradient."""
    named = trainable(layer, generator)
    ref_named = dict(trainable(reference, ref_generator))
    tensors = [x] + [p for _, p in named]
    ref_tensors = [x64] + [ref_named[n] for n, _ in named]
    got = torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)
    ref_grads = torch.autograd.grad(ref_loss, ref_tensors, allow_unused=True, retain_graph=True)
    want = [torch.zeros_like(t) if g is None else g for t, g in zip(ref_tensors, ref_grads)]
    scale = max(w.abs().max().item() for w in want)
    for name, a, b in zip(["input"] + [n for n, _ in named], got, want):
        a = torch.zeros_like(b) if a is None else a
        if b.abs().max() <= 1e-12 * scale:
            bound = depth * math.sqrt(4096) * torch.finfo(torch.float32).eps * scale
            assert a.abs().max() <= bound, f"grad {name}: {a.abs().max():.3e} where the exact gradient is 0"
        else:
            assert_fp32_close(a, b, depth=depth, what=f"grad {name}")


# --------------------------------------------------------------------------------------------- HyperMoE §6 item 7


def official_gpt2_hypermoe(layer, generator, x, padding_mask, act_name, noise=None):
    """Port of the official GPT-2 variant (Bumble666/Hyper_MoE gpt-2-moe/transformers/models/layers.py,
    `MoE.forward` + `noisy_top_k_gating_mixing` + `_prob_in_top_k` + `cv_squared`), one token at a time.
    `noise` [T, E] is the N(0, 1) draw of training; None is eval. Padding tokens are left out of the sums."""
    p = params_of(layer)
    w_gate, w_noise = p["router.weight"].t(), p["router.noise_weight"].t()  # [d, E], as the official parameters
    num_experts, top_k = w_gate.shape[1], layer.config.num_experts_per_tok
    tokens = x.reshape(-1, x.shape[-1])
    real = [True] * len(tokens) if padding_mask is None else [bool(m) for m in padding_mask.reshape(-1).tolist()]
    outputs, logits_rows, importance, load = [], [], 0.0, 0.0
    for t, v in enumerate(tokens):
        clean = torch.mv(w_gate.t(), v)  # x @ w_gate
        if noise is not None:
            noise_stddev = torch.log(1.0 + torch.exp(torch.mv(w_noise.t(), v))) + 1e-2  # softplus + noise_epsilon
            logits = clean + noise[t] * noise_stddev
        else:
            logits = clean
        probs = softmax(logits)  # the official code overwrites `logits` with the softmax
        order = descending(probs)
        top_values = [probs[e] for e in order[: min(top_k + 1, num_experts)]]
        chosen = order[:top_k]
        top_k_gates = torch.stack(top_values[:top_k])
        top_k_gates = top_k_gates / top_k_gates.sum()  # always renormalised
        gates = torch.zeros(num_experts, dtype=x.dtype).index_add(0, torch.tensor(chosen), top_k_gates)
        y = sum(g * expert_ffn(layer.experts, e, v, act_name) for g, e in zip(top_k_gates, chosen))
        outputs.append(y + hyper_expert(layer, generator, chosen, v))
        logits_rows.append(logits)
        if noise is not None and top_k < num_experts:
            # `_prob_in_top_k(clean_logits, noisy_logits, noise_stddev, top_logits)`, top_logits being probabilities
            threshold_if_in, threshold_if_out = top_values[top_k], top_values[top_k - 1]
            load_row = torch.stack([
                phi((clean[e] - threshold_if_in) / noise_stddev[e]) if logits[e] > threshold_if_in
                else phi((clean[e] - threshold_if_out) / noise_stddev[e])
                for e in range(num_experts)
            ])
        else:
            load_row = (gates > 0).to(x.dtype)  # `_gates_to_load`
        if real[t]:
            importance = importance + gates  # gates.sum(0)
            load = load + load_row
    return {
        "hidden_states": torch.stack(outputs).reshape(x.shape),
        "router_logits": torch.stack(logits_rows),
        "aux_loss": cv_squared(importance) + cv_squared(load),
        "real": torch.tensor(real).reshape(x.shape[:-1]),
    }


def noisy_layer(top_k, seed=0):
    layer, generator, act_name = make_layer(
        "hypermoe", top_k=top_k, dtype=torch.float32, seed=seed, router_type="noisy_top_k", norm_topk_prob=True
    )
    with torch.no_grad():  # the official zero init routes every token alike; make both gate matrices informative
        layer.router.weight.normal_(0.0, 0.3)
        layer.router.noise_weight.normal_(0.0, 0.3)
    return layer, generator, act_name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_hypermoe_noisy_top_k_matches_official_gpt2_variant(assert_fp32_close, training, top_k, padded):
    layer, generator, act_name = noisy_layer(top_k)
    assert isinstance(layer.router, NoisyTopKRouter)
    layer.train(training)
    x, mask = make_inputs(torch.float32, padded=padded)
    x = x.requires_grad_(True)
    torch.manual_seed(7)
    got = layer(x, mask)
    noise = None
    if training:  # the layer draws its N(0, 1) noise as one [T, E] tensor: replay it
        torch.manual_seed(7)
        noise = torch.randn(x.shape[0] * x.shape[1], layer.num_experts).double()

    reference, ref_generator = as_float64(layer, generator)
    x64 = x.detach().double().requires_grad_(True)
    want = official_gpt2_hypermoe(reference, ref_generator, x64, mask, act_name, noise)
    real = want["real"]
    assert_fp32_close(got.hidden_states[real], want["hidden_states"][real], depth=2, what="hidden_states")
    assert_fp32_close(got.router_logits, want["router_logits"], what="router_logits")
    assert_fp32_close(got.aux_loss, want["aux_loss"], depth=2, what="aux_loss")

    torch.manual_seed(123)
    probe = torch.randn(x.shape, dtype=torch.float64)
    loss = output_loss(got.hidden_states, real, probe.float())
    ref_loss = output_loss(want["hidden_states"], real, probe)
    compare_grads(assert_fp32_close, layer, generator, reference, ref_generator, loss, ref_loss, x, x64, depth=4)
    if training or top_k > 1:  # at eval with k = 1 the loss is constant: counts, and weights of exactly 1
        compare_grads(assert_fp32_close, layer, generator, reference, ref_generator, got.aux_loss, want["aux_loss"],
                      x, x64, depth=4)


def test_noisy_top_k_router_starts_at_zero_and_is_clean_at_eval():
    layer, _, _ = make_layer("hypermoe", top_k=1, dtype=torch.float32, router_type="noisy_top_k")
    assert not layer.router.weight.any() and not layer.router.noise_weight.any()  # official zero init
    layer.eval()
    x, _ = make_inputs(torch.float32, padded=False)
    first, second = layer(x).router_logits, layer(x).router_logits
    assert torch.equal(first, second) and not first.any()


# --------------------------------------------------------------------------------------------- HyperMoE §6 item 5


def gpt2_init_weights(module, initializer_range):
    """Port of the vendored GPT-2 `GPT2PreTrainedModel._init_weights` (transformers 4.30) on Linear and Embedding."""
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(mean=0.0, std=initializer_range)
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.data.normal_(mean=0.0, std=initializer_range)


def test_hypermoe_normal_init_is_gpt2_generic_init():
    layer, generator, _ = make_layer("hypermoe", dtype=torch.float32, big_hyper_init=False, hyper_init="normal")
    std = layer.config.initializer_range
    expected_generator, expected_layer = copy.deepcopy(generator), copy.deepcopy(layer)

    torch.manual_seed(5)
    generator.reset_parameters()
    layer.reset_parameters()
    torch.manual_seed(5)  # `model.apply(_init_weights)` visits the new modules in registration order
    expected_generator.apply(lambda m: gpt2_init_weights(m, std))
    for module in (expected_layer.expert_embedding, expected_layer.embedding_process):
        module.apply(lambda m: gpt2_init_weights(m, std))

    for name, value in generator.state_dict().items():
        assert torch.equal(value, expected_generator.state_dict()[name]), f"generator.{name}"
    for prefix in ("expert_embedding.", "embedding_process."):
        for name, value in layer.state_dict().items():
            if name.startswith(prefix):
                assert torch.equal(value, expected_layer.state_dict()[name]), name


def test_hypermoe_init_options_survive_model_initialisation():
    tiny = models.make_model("HyperMoe", "gpt2", "ForCausalLM")
    normal = models.make_model("HyperMoe", "gpt2", "ForCausalLM", hyper_init="normal", initializer_range=0.02)
    heads = [g.weight_down.weight for g in normal.base_model.hyper_generators.values()]
    tiny_heads = [g.weight_down.weight for g in tiny.base_model.hyper_generators.values()]
    assert all(0.015 < w.std() < 0.025 for w in heads)  # N(0, 0.02) over 16 x 256 entries
    assert all(w.abs().max() < 1e-3 for w in tiny_heads)  # the tiny official init


# --------------------------------------------------------------------------------------------- HyperRouter §6 item 3


def test_hyperrouter_dense_uniform_matches_official_dense_mode(assert_fp32_close):
    layer, _, act_name = make_layer("hyperrouter", top_k=2, dtype=torch.float32)
    x, _ = make_inputs(torch.float32, padded=False)
    sparse = layer(x).hidden_states
    layer.config.router_dense_uniform = True  # read at every forward, as the official `set_router_mode`
    got = layer(x)

    reference, _ = as_float64(layer)
    num_experts = layer.num_experts
    # custom_gate.py, dense_moe_flag: gate = ones_like(gate); top_k = E; gate_score = softmax(top-k values)
    gate_score = softmax(torch.ones(num_experts, dtype=torch.float64))
    want = torch.stack([
        sum(gate_score[e] * expert_ffn(reference.experts, e, v, act_name) for e in range(num_experts))
        for v in x.double().reshape(-1, HIDDEN)
    ]).reshape(x.shape)
    assert_fp32_close(got.hidden_states, want, depth=2, what="hidden_states")
    assert torch.equal(got.expert_load, torch.ones(num_experts))
    assert got.mean_experts_per_token == num_experts
    layer.config.router_dense_uniform = False
    assert torch.equal(layer(x).hidden_states, sparse)


# --------------------------------------------------------------------------------------------- MH-MoE §6


def reference_mh(layer, x, padding_mask, act_name):
    """MH-MoE one sub-token at a time (paper v1 Algorithm 1 and Eq. 6; official yushuiwx/MH-MoE `tutel_moe_layer.py`,
    `tutel_routing.py`), following the layer's options: the residual inside, the cosine router, the official
    `gshard_loss` over first choices, and padding counted as the official gate counts it (it never sees the mask)."""
    config, p = layer.config, params_of(layer)
    heads, num_experts, top_k = config.moe_num_heads, config.num_experts, config.num_experts_per_tok
    sub = x.shape[-1] // heads
    tokens = x.reshape(-1, x.shape[-1])
    real = [True] * len(tokens) if padding_mask is None else [bool(m) for m in padding_mask.reshape(-1).tolist()]
    counted, rows = [], []
    for v, r in zip(tokens, real):
        if heads > 1:
            v = linear(p["head_proj.weight"], p["head_proj.bias"], v)
        rows += [v[j * sub : (j + 1) * sub] for j in range(heads)]
        counted += [r or not config.router_ignore_padding_tokens] * heads

    logits, probs, choices, outputs = [], [], [], []
    for v in rows:
        if config.router_type == "xmoe":  # cos(W v, e_i) / tau
            u = torch.mv(p["router.projection"], v)
            emb = p["router.expert_embedding"]
            z = torch.stack([
                torch.dot(u, emb[e]) / (torch.sqrt((u * u).sum()) * torch.sqrt((emb[e] * emb[e]).sum()))
                for e in range(num_experts)
            ]) / config.router_temperature
        else:
            z = torch.mv(p["router.weight"], v)
        prob = softmax(z)
        chosen, w = choose_top_k(prob, top_k, norm_rule(config.norm_topk_prob, top_k))
        y = sum(w[j] * expert_ffn(layer.experts, e, v, act_name) for j, e in enumerate(chosen))
        outputs.append(y + v if config.moe_residual_inside else y)  # Eq. 6: o = x + sum_p g_p FFN_p(x)
        logits.append(z)
        probs.append(prob)
        choices.append(chosen)

    merged = [torch.cat(outputs[i * heads : (i + 1) * heads]) for i in range(len(tokens))]
    if heads > 1:
        merged = [linear(p["merge_proj.weight"], p["merge_proj.bias"], y) for y in merged]

    n = sum(counted)
    kept = [i for i, c in enumerate(counted) if c]
    if config.router_aux_loss_top1:  # gshard_loss(gates, topk_indices): mask hot value E / S on the first choice
        me = sum(probs[i] for i in kept)
        ce = torch.zeros(num_experts, dtype=x.dtype)
        for i in kept:
            ce[choices[i][0]] += num_experts / n
        aux = (me * ce).sum() / n
    else:  # Switch form over every choice (docs/topk.md §3)
        fraction = torch.tensor([sum(e in choices[i] for i in kept) / n for e in range(num_experts)], dtype=x.dtype)
        aux = num_experts * (fraction * (sum(probs[i] for i in kept) / n)).sum()
    load = torch.tensor([sum(e in choices[i] for i in kept) / n for e in range(num_experts)], dtype=x.dtype)
    return {
        "hidden_states": torch.stack(merged).reshape(x.shape),
        "router_logits": torch.stack(logits),
        "aux_loss": aux,
        "expert_load": load,
        "real": torch.tensor(real).reshape(x.shape[:-1]),
    }


MH_OPTIONS = {
    "default": {},
    "residual_inside": {"moe_residual_inside": True},
    "xmoe": {"router_type": "xmoe", "router_temperature": 0.3},
    "top1_loss": {"router_aux_loss_top1": True},
    "padding_counted": {"router_ignore_padding_tokens": False},
    "official": {
        "norm_topk_prob": False,
        "router_aux_loss_top1": True,
        "router_ignore_padding_tokens": False,
        "router_init": "torch_default",
        "head_proj_bias_init": "torch_default",
    },
    "paper": {"moe_residual_inside": True, "router_type": "xmoe"},
}


@pytest.mark.parametrize("family", ["mh2", "mh1"])
@pytest.mark.parametrize("option", list(MH_OPTIONS))
def test_mh_moe_options_match_reference(assert_fp32_close, option, family):
    layer, _, act_name = make_layer(family, top_k=2, dtype=torch.float32, **MH_OPTIONS[option])
    x, mask = make_inputs(torch.float32, padded=True)
    x = x.requires_grad_(True)
    got = layer(x, mask)
    reference, _ = as_float64(layer)
    x64 = x.detach().double().requires_grad_(True)
    want = reference_mh(reference, x64, mask, act_name)

    real = want["real"]
    assert_fp32_close(got.hidden_states[real], want["hidden_states"][real], depth=3, what="hidden_states")
    assert_fp32_close(got.router_logits, want["router_logits"], what="router_logits")
    assert_fp32_close(got.aux_loss, want["aux_loss"], what="aux_loss")
    assert_fp32_close(got.expert_load, want["expert_load"], what="expert_load")

    torch.manual_seed(123)
    probe = torch.randn(x.shape, dtype=torch.float64)
    loss = output_loss(got.hidden_states, real, probe.float())
    ref_loss = output_loss(want["hidden_states"], real, probe)
    compare_grads(assert_fp32_close, layer, None, reference, None, loss, ref_loss, x, x64, depth=4)
    compare_grads(assert_fp32_close, layer, None, reference, None, got.aux_loss, want["aux_loss"], x, x64, depth=4)


def test_mh_moe_top1_loss_differs_from_switch_loss_only_beyond_k1():
    x, _ = make_inputs(torch.float32, padded=False)
    for top_k, equal in ((1, True), (2, False)):
        switch, _, _ = make_layer("mh2", top_k=top_k, dtype=torch.float32)
        top1, _, _ = make_layer("mh2", top_k=top_k, dtype=torch.float32, router_aux_loss_top1=True)
        assert torch.equal(switch(x).aux_loss, top1(x).aux_loss) == equal


def test_mh_moe_padding_counted_like_official_gate():
    """`router_ignore_padding_tokens=False` routes a padded batch exactly as the same batch without a mask."""
    x, mask = make_inputs(torch.float32, padded=True)
    layer, _, _ = make_layer("mh2", dtype=torch.float32, router_ignore_padding_tokens=False,
                             expert_capacity_rule="gshard")  # the official capacity k * ceil(S' / E)
    with_mask, without = layer(x, mask), layer(x)
    counted, _, _ = make_layer("mh2", dtype=torch.float32, expert_capacity_rule="gshard")
    assert not torch.equal(counted(x, mask).expert_load, counted(x).expert_load)  # the default leaves padding out
    for key in ("hidden_states", "aux_loss", "z_loss", "expert_load", "mean_experts_per_token"):
        assert torch.equal(getattr(with_mask, key), getattr(without, key)), key


def kolmogorov_smirnov_uniform(values: torch.Tensor, bound: float) -> float:
    """sup |F_n - F| of `values` against U(-bound, bound)."""
    v = values.detach().double().flatten().sort().values
    n = v.numel()
    cdf = (v + bound) / (2 * bound)
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((steps - cdf).abs().max().item(), (cdf - (steps - 1 / n)).abs().max().item())


def test_mh_moe_head_bias_torch_default_init():
    """Official: `multi_heads = nn.Linear(d, d)` keeps PyTorch's bias init U(±1/sqrt(d)) (docs/mh_moe.md §6, item 6)."""
    width = 1024
    config = make_config("mh2", head_proj_bias_init="torch_default")
    torch.manual_seed(0)
    layer = MultiHeadMoeLayer(config, FfnSpec(width, INTERMEDIATE, "silu", True, False))
    bias, bound = layer.head_proj.bias, 1 / math.sqrt(width)
    assert bias.abs().max() <= bound
    assert kolmogorov_smirnov_uniform(bias, bound) < 1.63 / math.sqrt(width)  # KS test at the 1 % level
    assert not make_layer("mh2", dtype=torch.float32)[0].head_proj.bias.any()  # default: zeros


def test_mh_moe_router_torch_default_init_is_nn_linear():
    """Official: the gate `wg = nn.Linear(d/h, E, bias=False)` keeps PyTorch's init (docs/mh_moe.md §6, item 8)."""
    config = make_config("mh2", router_init="torch_default")
    router_width = HIDDEN // config.moe_num_heads
    torch.manual_seed(3)
    router = TorchInitRouter(config, router_width)
    torch.manual_seed(3)
    official = nn.Linear(router_width, config.num_experts, bias=False)
    assert torch.equal(router.weight, official.weight)


def test_mh_moe_init_options_survive_model_initialisation():
    model = models.make_model(
        "MultiHeadMoe", "llama", "ForCausalLM", router_init="torch_default", head_proj_bias_init="torch_default"
    )
    for block in model.moe_blocks():
        layer = block.moe
        assert isinstance(layer.router, TorchInitRouter)
        bound = 1 / math.sqrt(layer.hidden_size)  # nn.Linear(d/h, E): U(±1/sqrt(d/h)), far wider than N(0, 0.02)
        assert layer.router.weight.abs().max() <= bound and layer.router.weight.std() > 0.1
        assert layer.head_proj.bias.abs().max() <= 1 / math.sqrt(2 * layer.hidden_size) and layer.head_proj.bias.any()


def test_mh_moe_xmoe_router_init():
    config = make_config("mh2", router_type="xmoe")
    router = CosineRouter(config, HIDDEN // 2)
    assert router.projection.shape == (16, HIDDEN // 2) and router.expert_embedding.shape == (config.num_experts, 16)
    gram = router.expert_embedding @ router.expert_embedding.t()  # orthogonal rows (E <= 16), gain 0.32
    assert torch.allclose(gram, 0.32**2 * torch.eye(config.num_experts), atol=1e-6)


# --------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "family,field,value",
    [
        ("hypermoe", "hyper_init", "xavier"),
        ("hypermoe", "router_type", "xmoe"),
        ("mh2", "router_type", "noisy_top_k"),
        ("mh2", "router_xmoe_dim", 0),
        ("mh2", "router_temperature", 0.0),
        ("mh2", "head_proj_bias_init", "normal"),
        ("mh2", "router_init", "zeros"),
    ],
)
def test_invalid_option_names_field(family, field, value):
    with pytest.raises(ValueError, match=field):
        make_config(family, **{field: value})


def test_router_init_refused_with_xmoe_router():
    with pytest.raises(ValueError, match="router_init"):
        make_config("mh2", router_type="xmoe", router_init="torch_default")


def test_defaults_unchanged():
    hyper, router, mh = make_config("hypermoe"), make_config("hyperrouter"), make_config("mh2")
    assert (hyper.hyper_init, hyper.router_type) == ("tiny", "linear")
    assert router.router_dense_uniform is False
    assert (mh.moe_residual_inside, mh.router_type, mh.router_aux_loss_top1) == (False, "linear", False)
    assert (mh.router_ignore_padding_tokens, mh.head_proj_bias_init, mh.router_init) == (True, "zeros", "normal")
