"""Builders and comparison helpers shared by the layer tests (tiny sizes, seeded)."""

import torch

from hf_moe import (
    DynamicMoeConfig,
    DynamicMoeLayer,
    FfnSpec,
    HyperExpertGenerator,
    HyperMoeConfig,
    HyperMoeLayer,
    HyperRouterConfig,
    HyperRouterLayer,
    MultiHeadMoeConfig,
    MultiHeadMoeLayer,
    TopKMoeConfig,
    TopKMoeLayer,
)

HIDDEN = 32
INTERMEDIATE = 48
NUM_LAYERS = 3
LAYER_IDX = 1

TEXT_CONFIG = {
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 4,
}

# name -> (hidden_act, gated, bias)
FFN_KINDS = {
    "gated_silu": ("silu", True, False),
    "biased_gelu": ("gelu", False, True),
    "plain_relu": ("relu", False, False),
}

# test family name -> (reference family, config class, layer class, family-specific config values)
FAMILIES = {
    "topk": ("topk", TopKMoeConfig, TopKMoeLayer, {}),
    "hypermoe": (
        "hypermoe",
        HyperMoeConfig,
        HyperMoeLayer,
        {"hyper_embedding_dim": 16, "hyper_layer_embedding_dim": 4, "hyper_hidden_dim": 24, "hyper_adapter_rank": 8},
    ),
    "hyperrouter": ("hyperrouter", HyperRouterConfig, HyperRouterLayer, {"hyper_router_hidden_dim": 32}),
    "mh2": ("mh", MultiHeadMoeConfig, MultiHeadMoeLayer, {"moe_num_heads": 2}),
    "mh1": ("mh", MultiHeadMoeConfig, MultiHeadMoeLayer, {"moe_num_heads": 1}),
    "dynamic": ("dynamic", DynamicMoeConfig, DynamicMoeLayer, {}),
}


def make_config(family: str, *, num_experts=4, top_k=2, **overrides):
    _, config_class, _, extra = FAMILIES[family]
    kwargs = {
        "text_config": dict(TEXT_CONFIG),
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "experts_implementation": "eager",
        # larger than the 0.02 default so that routing is decisive and every path contributes O(1)
        "initializer_range": 0.2,
        **extra,
    }
    kwargs.update(overrides)
    return config_class(**kwargs)


def make_layer(
    family: str,
    *,
    num_experts=4,
    top_k=2,
    ffn_kind="gated_silu",
    dtype=torch.float64,
    seed=0,
    big_hyper_init=True,
    **overrides,
):
    """A seeded layer (and, for HyperMoE, its generator) in `dtype`. Returns (layer, generator or None, act_name)."""
    torch.manual_seed(seed)
    _, _, layer_class, _ = FAMILIES[family]
    config = make_config(family, num_experts=num_experts, top_k=top_k, **overrides)
    act_name, gated, bias = FFN_KINDS[ffn_kind]
    ffn = FfnSpec(HIDDEN, INTERMEDIATE, act_name, gated, bias)
    generator = None
    if family == "hypermoe":
        generator = HyperExpertGenerator(config, HIDDEN, NUM_LAYERS)
        if big_hyper_init:
            # the official tiny init makes the HyperExpert ~0; make it O(1) so the hyper path is really checked
            with torch.no_grad():
                for name, param in generator.named_parameters():
                    if name.split(".")[0] in ("weight_down", "bias_down", "weight_up", "bias_up"):
                        param.normal_(0.0, 0.1)
        layer = layer_class(config, ffn, LAYER_IDX, generator)
        generator.to(dtype)
    else:
        layer = layer_class(config, ffn, LAYER_IDX)
    layer.to(dtype)
    return layer, generator, act_name


def make_inputs(dtype=torch.float64, padded=True, batch=2, seq=5, seed=1):
    """x [B, S, H] ~ N(0, 1) and a padding mask with zeros in both rows (or None)."""
    torch.manual_seed(seed)
    x = torch.randn(batch, seq, HIDDEN, dtype=dtype)
    mask = None
    if padded:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, -1] = 0
        mask[1, 1] = 0
        mask[1, -2:] = 0
    return x, mask


def trainable(layer, generator=None):
    """(name, parameter) of every trainable tensor the layer's forward uses."""
    named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    if generator is not None:
        named += [(f"generator.{n}", p) for n, p in generator.named_parameters() if p.requires_grad]
    return named


def scalar_loss(out: dict, probe: torch.Tensor, padding_mask, coefs=(0.7, 0.3, 0.5)):
    """A scalar mixing the real tokens' outputs and every differentiable loss the layer reports."""
    hidden = out["hidden_states"]
    weight = probe if padding_mask is None else probe * padding_mask[..., None].to(probe.dtype)
    loss = (hidden * weight).sum() + coefs[0] * out["aux_loss"] + coefs[1] * out["z_loss"]
    loss = loss + coefs[2] * out["entropy_loss"]
    return loss


def as_dict(output) -> dict:
    return {k: getattr(output, k) for k in ("hidden_states", "router_logits", "aux_loss", "z_loss", "entropy_loss",
                                            "expert_load", "mean_experts_per_token")}


def grads(loss, tensors):
    result = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, result)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual - expected).norm().item()
    scale = expected.norm().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_rel_close(actual, expected, tol, what=""):
    actual = torch.as_tensor(actual)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
