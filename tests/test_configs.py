"""Config validation (errors name the field), config round trips, and MH-MoE size matching (v2 Eq. 8-9)."""

import re
from fractions import Fraction

import pytest
from transformers import AutoConfig

import hf_moe
from hf_moe import (
    DynamicMoeConfig,
    FfnSpec,
    HyperMoeConfig,
    HyperRouterConfig,
    MultiHeadMoeConfig,
    TopKMoeConfig,
    mh_moe_matched_sizes,
)

TEXT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4}
ALL_CLASSES = [TopKMoeConfig, HyperMoeConfig, HyperRouterConfig, MultiHeadMoeConfig, DynamicMoeConfig]


def build(cls, **kwargs):
    return cls(text_config=dict(TEXT), **{"num_experts": 4, "num_experts_per_tok": 2, **kwargs})


INVALID = [
    (TopKMoeConfig, {"num_experts_per_tok": 5}, "num_experts_per_tok"),
    (TopKMoeConfig, {"num_experts_per_tok": 0}, "num_experts_per_tok"),
    (TopKMoeConfig, {"num_experts": 0, "num_experts_per_tok": 1}, "num_experts"),
    (DynamicMoeConfig, {"router_top_p": 0.0}, "router_top_p"),
    (DynamicMoeConfig, {"router_top_p": -0.1}, "router_top_p"),
    (DynamicMoeConfig, {"router_top_p": 1.01}, "router_top_p"),
    (DynamicMoeConfig, {"router_max_experts": 0}, "router_max_experts"),
    (DynamicMoeConfig, {"router_max_experts": 5}, "router_max_experts"),
    (DynamicMoeConfig, {"router_entropy_loss_coef": -1e-4}, "router_entropy_loss_coef"),
    (MultiHeadMoeConfig, {"moe_num_heads": 3}, "moe_num_heads"),
    (MultiHeadMoeConfig, {"moe_num_heads": 64}, "moe_num_heads"),
    (MultiHeadMoeConfig, {"moe_num_heads": 0}, "moe_num_heads"),
    (TopKMoeConfig, {"expert_capacity_factor": 0.0}, "expert_capacity_factor"),
    (TopKMoeConfig, {"expert_capacity_factor": -1.0}, "expert_capacity_factor"),
    (TopKMoeConfig, {"moe_layers": [2]}, "moe_layers"),
    (TopKMoeConfig, {"moe_layers": [-1]}, "moe_layers"),
    (TopKMoeConfig, {"moe_layers": [0, 0]}, "moe_layers"),
    (TopKMoeConfig, {"moe_layers": []}, "moe_layers"),
    (HyperMoeConfig, {"hyper_adapter_rank": 0}, "hyper_adapter_rank"),
    (HyperMoeConfig, {"hyper_embedding_dim": 0}, "hyper_embedding_dim"),
    (HyperRouterConfig, {"norm_topk_prob": False}, "norm_topk_prob"),
    (HyperRouterConfig, {"hyper_router_hidden_dim": 0}, "hyper_router_hidden_dim"),
    (TopKMoeConfig, {"router_aux_loss_coef": -0.01}, "router_aux_loss_coef"),
    (TopKMoeConfig, {"router_z_loss_coef": -0.01}, "router_z_loss_coef"),
    (TopKMoeConfig, {"router_jitter_noise": 1.0}, "router_jitter_noise"),
    (TopKMoeConfig, {"router_jitter_noise": -0.1}, "router_jitter_noise"),
    (TopKMoeConfig, {"moe_intermediate_size": 0}, "moe_intermediate_size"),
    (TopKMoeConfig, {"initializer_range": 0.0}, "initializer_range"),
]


INVALID_IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw, _ in INVALID]


@pytest.mark.parametrize("cls,kwargs,field", INVALID, ids=INVALID_IDS)
def test_invalid_config_raises_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field) + "="):
        build(cls, **kwargs)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_shared_invalid_values_rejected_by_every_family(cls):
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        build(cls, num_experts_per_tok=9)
    with pytest.raises(ValueError, match="expert_capacity_factor"):
        build(cls, expert_capacity_factor=0.0)


def test_unknown_activation_raises_naming_hidden_act():
    with pytest.raises(ValueError, match="hidden_act"):
        FfnSpec(32, 64, "not_an_activation", True, False)


def test_valid_edge_values_are_accepted():
    build(TopKMoeConfig, num_experts_per_tok=4, moe_layers=[0, 1], expert_capacity_factor=1e-3)
    build(DynamicMoeConfig, router_top_p=1.0, router_max_experts=4)
    build(MultiHeadMoeConfig, moe_num_heads=32)
    build(HyperMoeConfig, num_experts=256, num_experts_per_tok=8)


def test_documented_defaults():
    topk = build(TopKMoeConfig)
    assert topk.norm_topk_prob is None and topk.expert_capacity_factor is None
    assert topk.router_aux_loss_coef == 0.01 and topk.router_z_loss_coef == 0.0 and topk.router_jitter_noise == 0.0
    assert topk.normalize_topk(2) and not topk.normalize_topk(1)
    hyper = build(HyperMoeConfig)
    assert (hyper.hyper_embedding_dim, hyper.hyper_layer_embedding_dim, hyper.hyper_hidden_dim,
            hyper.hyper_adapter_rank) == (128, 10, 128, 64)
    router = build(HyperRouterConfig)
    assert router.hyper_router_hidden_dim == 256 and router.norm_topk_prob is True
    assert router.router_aux_loss_coef == 0.0
    assert build(MultiHeadMoeConfig).moe_num_heads == 4
    dynamic = build(DynamicMoeConfig)
    assert dynamic.router_top_p == 0.4 and dynamic.router_max_experts is None
    assert dynamic.router_entropy_loss_coef == 1e-4 and dynamic.norm_topk_prob is False


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_config_round_trip_through_auto_config(cls, tmp_path):
    config = build(cls, num_experts=6, num_experts_per_tok=3, moe_layers=[1], expert_capacity_factor=1.25)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is cls
    assert loaded.model_type == cls.model_type
    for field in ("num_experts", "num_experts_per_tok", "moe_layers", "expert_capacity_factor", "norm_topk_prob",
                  "router_aux_loss_coef"):
        assert getattr(loaded, field) == getattr(config, field), field
    assert loaded.text_config.hidden_size == 32 and loaded.text_config.model_type == "llama"
    assert [f.config_class for f in hf_moe.all_families().values()].count(cls) == 1


# ------------------------------------------------------------------------------------ MH-MoE size matching


def test_mh_moe_matched_sizes_v2_examples():
    assert mh_moe_matched_sizes(768, 2048, 8, 1, 2, True, 2) == (768, 41)
    assert mh_moe_matched_sizes(768, 2048, 8, 1, 3, True, 3) == (512, 93)
    # methods.md §4.2 worked example (2-matrix FFN, k_mh = k): d_moe = 4d, k = 1, h = 3 -> d_mh = 3d, E_mh = 4E - 1
    assert mh_moe_matched_sizes(768, 4 * 768, 8, 1, 3, False) == (3 * 768, 4 * 8 - 1)


SIZE_CASES = [
    (768, 2048, 8, 1, 2, True, 2),
    (768, 2048, 8, 1, 3, True, 3),
    (768, 3072, 8, 1, 3, False, None),
    (512, 2048, 16, 2, 4, True, 2),
    (384, 1536, 8, 2, 2, False, None),
    (256, 1024, 8, 2, 1, True, 4),
    (768, 2048, 8, 1, 2, True, None),
    (600, 1000, 8, 3, 3, True, 2),
]


@pytest.mark.parametrize("d,inter,num_experts,k,h,gated,k_mh", SIZE_CASES)
def test_mh_moe_matched_sizes_equalise_flops_and_parameters(d, inter, num_experts, k, h, gated, k_mh):
    width, count = mh_moe_matched_sizes(d, inter, num_experts, k, h, gated, k_mh)
    matrices = 3 if gated else 2
    kk = k_mh or k
    overhead = 2 * d * d if h > 1 else 0  # head + merge projections
    exact_width = Fraction(k * matrices * d * inter - overhead, kk * matrices * d)
    assert abs(width - exact_width) <= Fraction(1, 2)
    if exact_width.denominator == 1:  # FLOPs per token equal exactly
        assert k * matrices * d * inter == overhead + kk * matrices * d * width
    if not gated and kk == k and h > 1:  # Eq. 8: d_mh = d_moe - d/k
        assert exact_width == inter - Fraction(d, k)
    exact_count = Fraction(num_experts * matrices * d * inter - overhead, matrices * Fraction(d, h) * width)
    assert abs(count - exact_count) <= Fraction(1, 2)  # parameter parity, rounded
