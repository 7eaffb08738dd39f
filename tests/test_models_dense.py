"""Function preservation: with every expert a copy of the dense FFN and renormalised top-2, the MoE model computes the
dense transformers backbone (same non-FFN weights) on every backbone. The dense -> expert copy is the tests' own
(`models_common.dense_ffn_as_expert`), not hf_moe's adapter."""

import pytest
import torch
from models_common import (
    backbone_of,
    dense_ffn_as_expert,
    layer_stacks,
    make_config,
    moe_of_layer,
    random_ids,
    text_config,
)
from transformers import AutoConfig, AutoModel

import hf_moe

pytestmark = pytest.mark.usefixtures("single_thread")

DENSE_BACKBONES = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "qwen3", "t5", "t5_gated")
# (family, extra config); HyperMoE adds its (tiny-init) HyperExpert and is checked apart
EXACT_FAMILIES = {
    "TopKMoe": {},
    "HyperRouter": {},
    "DynamicMoe": {"norm_topk_prob": True, "router_top_p": 0.4},
}


def _dense_and_moe(family, backbone, extra, seed=0, unit_embeddings=False):
    tc = text_config(backbone)
    torch.manual_seed(seed)
    dense = AutoModel.from_config(AutoConfig.for_model(**tc)).eval()
    if unit_embeddings:
        # tiny random pre-norm models carry a residual stream of std 0.02 (their embedding init); a real model's is
        # O(1), which is the scale the HyperExpert's "tiny init" is relative to
        with torch.no_grad():
            embedding = dense.get_input_embeddings().weight
            embedding /= embedding.std()
    config = make_config(
        family, backbone, **{"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True, **extra}
    )
    torch.manual_seed(seed + 1)
    moe = hf_moe.MODEL_CLASSES[family, "Model"](config).eval()
    inner = backbone_of(moe)
    assert type(inner) is type(dense)

    missing, unexpected = inner.load_state_dict(dense.state_dict(), strict=False)
    # only FFN weights are left out, and only MoE parameters stay unloaded
    ffn_words = ("intermediate.dense", "output.dense", "mlp.", "DenseReluDense")
    assert unexpected and all(any(w in k for w in ffn_words) for k in unexpected), unexpected
    assert missing and all(".moe." in k or k.startswith("hyper_generators.") for k in missing), missing
    return dense, moe, inner


def _copy_dense_ffn_into_every_expert(backbone, dense, inner):
    dense_stacks = layer_stacks(backbone, dense)
    moe_stacks = layer_stacks(backbone, inner)
    assert dense_stacks.keys() == moe_stacks.keys()
    copied = 0
    with torch.no_grad():
        for stack, dense_layers in dense_stacks.items():
            for dense_layer, moe_layer in zip(dense_layers, moe_stacks[stack], strict=True):
                experts = moe_of_layer(backbone, moe_layer).experts
                weights = dense_ffn_as_expert(backbone, dense_layer)
                assert {n for n, _ in experts.named_parameters()} == set(weights)
                for name, tensor in weights.items():
                    param = getattr(experts, name)
                    assert param.shape == (experts.num_experts, *tensor.shape), (name, param.shape, tensor.shape)
                    param.copy_(tensor.expand_as(param))
                    copied += 1
    assert copied > 0


def _inputs(backbone):
    ids = random_ids((2, 9), seed=5)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding: real tokens must match, whatever happens at padded positions
    inputs = {"input_ids": ids, "attention_mask": mask}
    if backbone.startswith("t5"):
        inputs["decoder_input_ids"] = random_ids((2, 4), seed=6)
    return inputs


def _depth(dense) -> int:
    """Layers between the inputs and the compared output (T5's decoder output follows its encoder)."""
    config = dense.config
    return config.num_hidden_layers + (getattr(config, "num_decoder_layers", 0) if config.is_encoder_decoder else 0)


def _outputs(model, backbone, inputs):
    with torch.no_grad():
        out = model(**inputs)
    real = inputs["attention_mask"].bool()
    tensors = []
    if backbone.startswith("t5"):
        tensors.append(out.encoder_last_hidden_state[real])
        tensors.append(out.last_hidden_state)  # decoder: every position is real
    else:
        tensors.append(out.last_hidden_state[real])
    return tensors


@pytest.mark.parametrize("family", list(EXACT_FAMILIES))
@pytest.mark.parametrize("backbone", DENSE_BACKBONES)
def test_identical_experts_reproduce_dense_backbone(family, backbone, assert_fp32_close):
    dense, moe, inner = _dense_and_moe(family, backbone, EXACT_FAMILIES[family])
    inputs = _inputs(backbone)
    expected = _outputs(dense, backbone, inputs)
    before = _outputs(moe, backbone, inputs)
    assert max((a - b).abs().max().item() for a, b in zip(before, expected)) > 1e-3, "random experts already match"

    _copy_dense_ffn_into_every_expert(backbone, dense, inner)
    for actual, ref in zip(_outputs(moe, backbone, inputs), expected, strict=True):
        assert_fp32_close(actual, ref, _depth(dense), "MoE of identical experts vs dense")


@pytest.mark.parametrize("backbone", DENSE_BACKBONES)
def test_identical_experts_hypermoe_close_to_dense_backbone(backbone):
    # the HyperExpert starts tiny (official init), so HyperMoE is the dense model up to ~1e-3 relative
    dense, moe, inner = _dense_and_moe("HyperMoe", backbone, {}, unit_embeddings=True)
    _copy_dense_ffn_into_every_expert(backbone, dense, inner)
    inputs = _inputs(backbone)
    for actual, ref in zip(_outputs(moe, backbone, inputs), _outputs(dense, backbone, inputs), strict=True):
        rel = ((actual - ref).norm() / ref.norm()).item()
        assert rel <= 1e-3, f"relative error {rel:.2e}"
        assert rel > 0, "the HyperExpert contributes nothing"


@pytest.mark.parametrize("backbone", ["llama", "bert"])
def test_identical_experts_multihead_one_head_reproduces_dense_backbone(backbone, assert_fp32_close):
    # MH-MoE with h = 1 has no head/merge projections and routes whole tokens: top-k on the token (methods.md §4)
    dense, moe, inner = _dense_and_moe("MultiHeadMoe", backbone, {"moe_num_heads": 1})
    _copy_dense_ffn_into_every_expert(backbone, dense, inner)
    inputs = _inputs(backbone)
    for actual, ref in zip(_outputs(moe, backbone, inputs), _outputs(dense, backbone, inputs), strict=True):
        assert_fp32_close(actual, ref, _depth(dense), "MH-MoE h=1 vs dense")
