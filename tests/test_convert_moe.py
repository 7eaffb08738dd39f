"""Conversion of existing MoE checkpoints (Mixtral, SwitchTransformers) into hf-moe families: exact logits, greedy
generation, save/load through `convert_moe`, dynamic top-p, and clear errors for what cannot be converted."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
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

import hf_moe
from hf_moe.conversion import convert_moe, convert_moe_model

MIXTRAL = {"depth": 2, "reduction": 48}  # 2 layers; longest reduction: the experts' 48-wide down projection
SWITCH = {"depth": 4, "reduction": 48}  # 2 encoder + 2 decoder blocks; d_ff 48


def _mixtral_config(**overrides):
    fields = {
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
        "initializer_range": 0.2,  # decisive routers and logits of order 1, so a wrong mapping shows
    }
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
def test_mixtral_converts_exactly(mixtral, family, assert_fp32_close):
    source, input_ids, attention_mask, reference = mixtral
    moe = convert_moe_model(source, family).eval()
    assert type(moe).__name__ == f"{hf_moe.get_family(family).class_prefix}ForCausalLM"
    assert moe.config.text_config.model_type == "mistral"
    assert (moe.config.num_experts, moe.config.num_experts_per_tok, moe.config.norm_topk_prob) == (4, 2, True)
    with torch.no_grad():
        assert_fp32_close(moe(input_ids, attention_mask=attention_mask).logits, reference, what=family, **MIXTRAL)
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


def test_mixtral_base_model_converts_to_the_base_head(assert_fp32_close):
    torch.manual_seed(2)
    source = MixtralModel(_mixtral_config(sliding_window=5, tie_word_embeddings=True)).eval()
    moe = convert_moe_model(source, "topk_moe").eval()
    assert type(moe).__name__ == "TopKMoeModel" and moe.config.text_config.sliding_window == 5
    input_ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        reference = source(input_ids).last_hidden_state
        assert_fp32_close(moe(input_ids).last_hidden_state, reference, what="hidden states", **MIXTRAL)


@pytest.mark.parametrize("family", ["topk_moe", "hypermoe"])
def test_mixtral_checkpoint_round_trip(mixtral, mixtral_folder, tmp_path, family, assert_fp32_close):
    source, input_ids, attention_mask, reference = mixtral
    out = convert_moe(mixtral_folder, tmp_path / "moe", family, dtype=torch.float32)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging folder renamed away
    card = (out / "README.md").read_text()
    assert "## Conversion" in card and "Same function as the source (float32, eval, no capacity drops): yes" in card
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == f"{hf_moe.get_family(family).class_prefix}ForCausalLM"
    with torch.no_grad():
        assert_fp32_close(model(input_ids, attention_mask=attention_mask).logits, reference, what=family, **MIXTRAL)
    assert torch.equal(_greedy(model, input_ids[1:]), _greedy(source, input_ids[1:]))


@pytest.mark.parametrize("family", ["topk_moe", "hypermoe"])
def test_switch_converts_exactly(switch, tmp_path, family, assert_fp32_close):
    source, inputs, reference = switch
    moe = convert_moe_model(source, family).eval()
    assert type(moe).__name__ == f"{hf_moe.get_family(family).class_prefix}ForConditionalGeneration"
    config = moe.config
    assert config.text_config.model_type == "t5" and config.text_config.dense_act_fn == "relu"
    assert (config.moe_layers, config.num_experts_per_tok, config.norm_topk_prob) == ([1], 1, False)
    assert config.moe_intermediate_size == 48 and config.expert_capacity_factor is None
    with torch.no_grad():
        assert_fp32_close(moe(**inputs).logits, reference, what=family, **SWITCH)

    source.save_pretrained(tmp_path / "switch")
    out = convert_moe(tmp_path / "switch", tmp_path / "moe", family, dtype=torch.float32)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_fp32_close(loaded(**inputs).logits, reference, what=f"{family} after save/load", **SWITCH)
    assert torch.equal(_greedy(loaded, inputs["input_ids"]), _greedy(source, inputs["input_ids"]))


def test_switch_capacity_drops_are_where_equivalence_ends(switch):
    """Documented limit: when Switch drops tokens (expert_capacity < tokens per expert), hf-moe (dropless) differs."""
    source, inputs, _reference = switch
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


def test_switch_base_model_with_stacks_of_different_depths(assert_fp32_close):
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
        assert_fp32_close(moe(**inputs).last_hidden_state, reference, what="hidden states", **{**SWITCH, "depth": 6})


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
    assert "top-p 0.7 routing replaces the source's top-2" in caplog.text
    assert moe.config.norm_topk_prob is True and moe.config.router_top_p == 0.7
    with torch.no_grad():
        output = moe(input_ids, attention_mask=attention_mask)
    means = [stats.mean_experts_per_token.item() for stats in output.router_stats]
    print(f"Mixtral -> dynamic_moe (p=0.7): mean experts per token by layer {means}, "
          f"max |logit diff| to Mixtral {_max_diff(output.logits, reference):.2e}")
    assert all(1 <= m <= 4 for m in means) and output.aux_loss is not None
    assert torch.isfinite(output.logits).all()


def test_unsupported_sources_and_families_name_what_is_supported(mixtral, switch):
    supported = "mixtral -> topk_moe, hypermoe, dynamic_moe; switch_transformers -> topk_moe, hypermoe"
    tiny = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "num_experts": 2, "num_experts_per_tok": 1}
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


def _checkpoint_tensors(folder) -> dict:
    return {name: tensor for shard in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(shard).items()}


@pytest.mark.parametrize("family", ["topk_moe", "hypermoe"])
def test_streamed_conversion_equals_the_in_memory_one(mixtral, mixtral_folder, tmp_path, family):
    """`convert_moe` streams the checkpoint; every tensor it writes is the in-memory `convert_moe_model`'s, and the
    router and experts are the source's own (read here from the loaded Mixtral)."""
    source = mixtral[0]
    out = convert_moe(mixtral_folder, tmp_path / "moe", family, dtype=torch.float32, max_shard_size=20_000)
    assert len(list(out.glob("*.safetensors"))) > 1  # several output shards
    streamed = _checkpoint_tensors(out)
    in_memory = convert_moe_model(source, family)
    state = in_memory.state_dict()
    tied = set(in_memory.get_expanded_tied_weights_keys(all_submodels=True))
    assert set(streamed) == set(state) - tied
    for name, tensor in streamed.items():
        assert torch.equal(tensor, state[name]), name
    for idx, layer in enumerate(source.model.layers):
        moe = f"model.layers.{idx}.mlp.moe"
        assert torch.equal(streamed[f"{moe}.router.weight"], layer.mlp.gate.weight)
        assert torch.equal(streamed[f"{moe}.experts.gate_up_proj"], layer.mlp.experts.gate_up_proj)
        assert torch.equal(streamed[f"{moe}.experts.down_proj"], layer.mlp.experts.down_proj)
        assert torch.equal(streamed[f"model.layers.{idx}.self_attn.q_proj.weight"], layer.self_attn.q_proj.weight)
    assert torch.equal(streamed["lm_head.weight"], source.lm_head.weight)


def test_streamed_switch_takes_every_expert_of_the_source(switch, tmp_path):
    source = switch[0]
    source.save_pretrained(tmp_path / "switch")
    streamed = _checkpoint_tensors(convert_moe(tmp_path / "switch", tmp_path / "moe", "topk_moe"))
    mlp = source.encoder.block[1].layer[-1].mlp
    experts = [mlp.experts[f"expert_{e}"] for e in range(4)]
    moe = "encoder.block.1.layer.1.DenseReluDense.moe"
    assert torch.equal(streamed[f"{moe}.router.weight"], mlp.router.classifier.weight)
    assert torch.equal(streamed[f"{moe}.experts.up_proj"], torch.stack([expert.wi.weight for expert in experts]))
    assert torch.equal(streamed[f"{moe}.experts.down_proj"], torch.stack([expert.wo.weight for expert in experts]))
    dense = source.encoder.block[0].layer[-1].mlp
    assert torch.equal(streamed["encoder.block.0.layer.1.DenseReluDense.wi.weight"], dense.wi.weight)


_PEAK_MEMORY = """
import sys
from pathlib import Path
from hf_moe.conversion import convert_moe

def status(field):  # kB
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

warmup, source, target = sys.argv[1:]
convert_moe(warmup, target + "-warmup", "hypermoe", progress=False)  # every code path once (lazy imports, caches)
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current resident size
before = status("VmRSS")
convert_moe(source, target, "hypermoe", progress=False)
print("PEAK", before, status("VmHWM"))
"""


def test_convert_moe_holds_about_one_tensor_at_a_time(tmp_path, mixtral_checkpoint):
    """The peak memory of converting a 12-layer Mixtral checkpoint (154 MiB) grows by a few of its largest tensors, far
    below the checkpoint's size: loading the source model alone would take all of it (the in-memory conversion grew by
    379 MiB). Linux's peak resident size is reset before the conversion, so the figure is the conversion's own."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    torch.manual_seed(0)
    config = _mixtral_config(hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_local_experts=8,
                             num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral", max_shard_size="8MB")
    size = sum(p.stat().st_size for p in (tmp_path / "mixtral").glob("*.safetensors"))
    warmup = mixtral_checkpoint(tmp_path / "warmup")
    # glibc serves large allocations from mmap (returned to the system when freed) rather than from a heap it keeps:
    # the figure is then what the conversion holds, not what the allocator retains (measured: 24 MiB vs 73 MiB)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    result = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(warmup), str(tmp_path / "mixtral"),
                             str(tmp_path / "moe")], capture_output=True, text=True, timeout=600, check=False, env=env)
    assert "PEAK" in result.stdout, result.stderr[-3000:]
    before, after = map(int, result.stdout.split("PEAK")[1].split())
    largest = 8 * 2 * 512 * 256 * 4  # a layer's gate_up_proj [E, 2I, H] in float32, 8.4 MB
    print(f"checkpoint {size / 2**20:.0f} MiB; peak memory grew by {(after - before) / 2**20:.0f} MiB")
    assert size > 18 * largest
    assert after - before < 6 * largest


def test_convert_moe_verifies_every_output(mixtral_folder, tmp_path):
    out = convert_moe(mixtral_folder, tmp_path / "moe", "topk_moe", dtype=torch.float32, verify=True)
    report = json.loads((out / "verification.json").read_text())["outputs"]
    assert set(report) == {"logits"} and report["logits"]["relative_error"] < 1e-5
    assert "## Verification" in (out / "README.md").read_text()
