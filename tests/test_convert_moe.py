"""Conversion of existing MoE checkpoints (Mixtral, SwitchTransformers) into hf-moe families: exact logits, greedy
generation, save/load through `convert_moe`, dynamic top-p, and clear errors for what cannot be converted."""

import logging

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    MixtralConfig,
    MixtralForCausalLM,
    MixtralModel,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
    SwitchTransformersModel,
)

import hf_moe  # noqa: F401  (registers the families with the Auto classes)
from hf_moe.conversion import convert_moe, convert_moe_model

from test_upcycle import fp32_tolerance


def _mixtral_tol(reference):
    return fp32_tolerance(reference, num_layers=2, reduction=48)  # 2 layers; longest reduction: experts' 48-wide down


def _switch_tol(reference, num_layers=4):
    return fp32_tolerance(reference, num_layers=num_layers, reduction=48)  # encoder + decoder blocks; d_ff 48


def _mixtral_config(**overrides):
    fields = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # decisive routers and logits of order 1, so a wrong mapping shows
    )
    return MixtralConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def mixtral():
    torch.manual_seed(0)
    model = MixtralForCausalLM(_mixtral_config()).eval()
    input_ids = torch.randint(3, 100, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
    return model, input_ids, attention_mask, logits


@pytest.fixture(scope="module")
def mixtral_folder(mixtral, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral")
    mixtral[0].save_pretrained(folder)  # legacy per-expert layout (w1/w2/w3), re-fused by transformers on load
    return folder


@pytest.fixture(scope="module")
def switch():
    torch.manual_seed(1)
    config = SwitchTransformersConfig(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=4,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        expert_capacity=64,  # >= tokens per sequence: Switch drops nothing
        decoder_start_token_id=0,
    )
    model = SwitchTransformersForConditionalGeneration(config).eval()
    inputs = {
        "input_ids": torch.randint(2, 100, (2, 10)),
        "attention_mask": torch.tensor([[1] * 10, [1] * 7 + [0] * 3]),
        "decoder_input_ids": torch.randint(2, 100, (2, 6)),
    }
    with torch.no_grad():
        logits = model(**inputs).logits
    return model, inputs, logits


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _greedy(model, input_ids, **kwargs):
    return model.generate(input_ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, **kwargs)


@pytest.mark.parametrize("family", ["topk_moe", "hypermoe"])
def test_mixtral_converts_exactly(mixtral, family):
    source, input_ids, attention_mask, reference = mixtral
    moe = convert_moe_model(source, family).eval()
    assert type(moe).__name__ == f"{hf_moe.FAMILY_NAMES[family]}ForCausalLM"
    assert moe.config.text_config.model_type == "mistral"
    assert (moe.config.num_experts, moe.config.num_experts_per_tok, moe.config.norm_topk_prob) == (4, 2, True)
    with torch.no_grad():
        diff = _max_diff(moe(input_ids, attention_mask=attention_mask).logits, reference)
    print(f"Mixtral -> {family}: max |logit diff| {diff:.2e} (logits up to {reference.abs().max():.2f})")
    assert diff <= _mixtral_tol(reference)
    assert torch.equal(_greedy(moe, input_ids[1:]), _greedy(source, input_ids[1:]))


def test_mixtral_conversion_is_sensitive_to_the_mapping(mixtral):
    """Negative controls: permuted router rows, and HyperMoE's (non-zeroed) official init, both move the logits."""
    source, input_ids, attention_mask, reference = mixtral
    moe = convert_moe_model(source, "topk_moe").eval()
    with torch.no_grad():
        for block in moe.moe_blocks():
            block.moe.router.weight.copy_(block.moe.router.weight.roll(1, dims=0))
        assert _max_diff(moe(input_ids, attention_mask=attention_mask).logits, reference) > 1e-2
        hyper = convert_moe_model(source, "hypermoe", zero_hyper_expert=False).eval()
        diff = _max_diff(hyper(input_ids, attention_mask=attention_mask).logits, reference)
    print(f"Mixtral -> hypermoe with the tiny official HyperExpert init: max |logit diff| {diff:.2e}")
    assert 0 < diff < 1e-2


def test_mixtral_base_model_converts_to_the_base_head():
    torch.manual_seed(2)
    source = MixtralModel(_mixtral_config(sliding_window=5, tie_word_embeddings=True)).eval()
    moe = convert_moe_model(source, "topk_moe").eval()
    assert type(moe).__name__ == "TopKMoeModel" and moe.config.text_config.sliding_window == 5
    input_ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        reference = source(input_ids).last_hidden_state
        assert _max_diff(moe(input_ids).last_hidden_state, reference) <= _mixtral_tol(reference)


@pytest.mark.parametrize("family", ["topk_moe", "hypermoe"])
def test_mixtral_checkpoint_round_trip(mixtral, mixtral_folder, tmp_path, family):
    source, input_ids, attention_mask, reference = mixtral
    out = convert_moe(mixtral_folder, tmp_path / "moe", family, dtype=torch.float32)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging folder renamed away
    card = (out / "README.md").read_text()
    assert "## Conversion" in card and "Same function as the source (float32, eval, no capacity drops): yes" in card
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == f"{hf_moe.FAMILY_NAMES[family]}ForCausalLM"
    with torch.no_grad():
        diff = _max_diff(model(input_ids, attention_mask=attention_mask).logits, reference)
    print(f"Mixtral -> {family} -> save/load: max |logit diff| {diff:.2e}")
    assert diff <= _mixtral_tol(reference)
    assert torch.equal(_greedy(model, input_ids[1:]), _greedy(source, input_ids[1:]))


@pytest.mark.parametrize("family", ["topk_moe", "hypermoe"])
def test_switch_converts_exactly(switch, tmp_path, family):
    source, inputs, reference = switch
    moe = convert_moe_model(source, family).eval()
    assert type(moe).__name__ == f"{hf_moe.FAMILY_NAMES[family]}ForConditionalGeneration"
    config = moe.config
    assert config.text_config.model_type == "t5" and config.text_config.dense_act_fn == "relu"
    assert (config.moe_layers, config.num_experts_per_tok, config.norm_topk_prob) == ([1], 1, False)
    assert config.moe_intermediate_size == 48 and config.expert_capacity_factor is None
    with torch.no_grad():
        diff = _max_diff(moe(**inputs).logits, reference)
    print(f"Switch -> {family}: max |logit diff| {diff:.2e} (logits up to {reference.abs().max():.2f})")
    assert diff <= _switch_tol(reference)

    source.save_pretrained(tmp_path / "switch")
    out = convert_moe(tmp_path / "switch", tmp_path / "moe", family, dtype=torch.float32)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = _max_diff(loaded(**inputs).logits, reference)
    print(f"Switch -> {family} -> save/load: max |logit diff| {diff:.2e}")
    assert diff <= _switch_tol(reference)
    assert torch.equal(_greedy(loaded, inputs["input_ids"]), _greedy(source, inputs["input_ids"]))


def test_switch_capacity_drops_are_where_equivalence_ends(switch):
    """Documented limit: when Switch drops tokens (expert_capacity < tokens per expert), hf-moe (dropless) differs."""
    source, inputs, reference = switch
    moe = convert_moe_model(source, "topk_moe").eval()
    routers = [module for module in source.modules() if hasattr(module, "expert_capacity")]
    try:
        for router in routers:
            router.expert_capacity = 1
        with torch.no_grad():
            dropped = source(**inputs).logits
            assert _max_diff(moe(**inputs).logits, dropped) > 1e-3
    finally:
        for router in routers:
            router.expert_capacity = source.config.expert_capacity


def test_switch_base_model_with_stacks_of_different_depths():
    """4 encoder blocks (sparse 1, 3) and 2 decoder blocks (sparse 1): one moe_layer_frequency=2 covers both."""
    torch.manual_seed(3)
    config = SwitchTransformersConfig(
        vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=4, num_decoder_layers=2, num_heads=4, num_experts=4,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, expert_capacity=64,
    )
    source = SwitchTransformersModel(config).eval()
    moe = convert_moe_model(source, "hypermoe").eval()
    assert type(moe).__name__ == "HyperMoeModel"
    assert (moe.config.moe_layers, moe.config.moe_layer_frequency) == (None, 2)
    assert [b.moe.layer_idx for b in moe.moe_blocks()] == [1, 3, 1]
    inputs = {"input_ids": torch.randint(2, 100, (2, 9)), "decoder_input_ids": torch.randint(2, 100, (2, 5))}
    with torch.no_grad():
        reference = source(**inputs).last_hidden_state
        assert _max_diff(moe(**inputs).last_hidden_state, reference) <= _switch_tol(reference, num_layers=6)


def test_untied_switch_is_refused():
    config = SwitchTransformersConfig(
        vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, num_experts=4,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, tie_word_embeddings=False,
    )
    with pytest.raises(ValueError, match="untied lm_head"):
        convert_moe_model(SwitchTransformersForConditionalGeneration(config), "topk_moe")


def test_dynamic_moe_from_mixtral_runs_and_reports_mean_experts(mixtral, caplog):
    source, input_ids, attention_mask, reference = mixtral
    with caplog.at_level(logging.WARNING, logger="hf_moe.conversion.from_moe"):
        moe = convert_moe_model(source, "dynamic_moe", router_top_p=0.7).eval()
    assert "top-p routing (router_top_p=0.7) replaces the source's top-2" in caplog.text
    assert moe.config.norm_topk_prob is True and moe.config.router_top_p == 0.7
    with torch.no_grad():
        output = moe(input_ids, attention_mask=attention_mask)
    means = [block.layer_output.mean_experts_per_token.item() for block in moe.moe_blocks()]
    print(f"Mixtral -> dynamic_moe (p=0.7): mean experts per token by layer {means}, "
          f"max |logit diff| to Mixtral {_max_diff(output.logits, reference):.2e}")
    assert all(1 <= m <= 4 for m in means) and output.aux_loss is not None
    assert torch.isfinite(output.logits).all()


def test_unsupported_sources_and_families_name_what_is_supported(mixtral, switch):
    supported = "mixtral -> topk_moe, hypermoe, dynamic_moe; switch_transformers -> topk_moe, hypermoe"
    tiny = dict(vocab_size=50, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, num_experts=2, num_experts_per_tok=1)
    qwen = Qwen2MoeForCausalLM(Qwen2MoeConfig(**tiny, moe_intermediate_size=8, shared_expert_intermediate_size=8))
    olmoe = OlmoeForCausalLM(OlmoeConfig(**tiny))
    for source, reason in ((qwen, "shared expert"), (olmoe, "q_norm/k_norm")):
        with pytest.raises(ValueError, match=reason) as error:
            convert_moe_model(source, "topk_moe")
        assert supported in str(error.value)
    cases = [
        (mixtral[0], "hyperrouter", "router weights cannot be reused"),
        (mixtral[0], "mh_moe", "experts cannot be reused"),
        (switch[0], "dynamic_moe", "Mixtral sources only"),
        (mixtral[0], "no_such_family", "Unknown family"),
    ]
    for source, family, reason in cases:
        with pytest.raises(ValueError, match=reason) as error:
            convert_moe_model(source, family)
        assert supported in str(error.value)
    with pytest.raises(ValueError, match="num_experts come"):
        convert_moe_model(mixtral[0], "topk_moe", num_experts=8)


def test_existing_target_refused_then_overwritten(mixtral, mixtral_folder, tmp_path):
    target = tmp_path / "moe"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_moe(mixtral_folder, target, "topk_moe")
    assert (target / "keep.txt").read_text() == "old"
    with pytest.raises(ValueError, match="hyperrouter"):
        convert_moe(mixtral_folder, tmp_path / "other", "hyperrouter")  # refused before loading, nothing written
    assert not (tmp_path / "other").exists()
    out = convert_moe(mixtral_folder, target, "topk_moe", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]
