"""Modeling fixes of issue #10: HyperRouter's hypernetwork stays frozen on every path that yields a model (1),
non-finite padding reaches no router statistic (4), run-time and config errors name the field (7), HyperMoE beyond
63 experts (8)."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from layer_helpers import FAMILIES, as_dict, make_inputs, make_layer
from models_common import VOCAB, make_model, text_config
from models_common import make_inputs as make_model_inputs
from peft import get_peft_model
from references import reference_layer
from test_layers import check_against_reference
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_moe
from hf_moe.conversion import upcycle, upcycle_model
from hf_moe.training.peft import moe_lora_config

# ------------------------------------------------------------------------------------ 1. HyperRouter's hypernetwork


def one_adamw_step(model, inputs):
    """(trainable parameter names, state before, state after) around one AdamW step on every trainable parameter."""
    model.train()
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    before = {key: value.detach().clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(**inputs).loss.backward()
    optimizer.step()
    return trainable, before, model.state_dict()


def assert_hypernet_frozen(trainable, before, after):
    hypernet = [key for key in before if ".hypernet." in key]
    assert hypernet and len(hypernet) % 4 == 0, sorted(before)  # two linears (weight, bias) per MoE layer
    assert not [name for name in trainable if ".hypernet." in name], "a hypernetwork tensor is trainable"
    for key in hypernet:
        assert torch.equal(after[key], before[key]), f"{key} changed in one optimizer step"
    embeddings = [key for key in before if key.endswith("router_embedding")]
    assert any(not torch.equal(after[key], before[key]) for key in embeddings), "the step trained nothing"


def llama_inputs():
    return make_model_inputs("llama", "ForCausalLM", seed=3)


@pytest.fixture(scope="module")
def saved_hyperrouter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hyperrouter")
    make_model("HyperRouter", "llama", "ForCausalLM").save_pretrained(folder)
    return folder


def test_hypernet_frozen_after_construction():
    model = make_model("HyperRouter", "llama", "ForCausalLM")
    assert_hypernet_frozen(*one_adamw_step(model, llama_inputs()))


@pytest.mark.parametrize("loader", ["class", "auto", "auto_resized"])
def test_hypernet_frozen_after_from_pretrained(saved_hyperrouter, loader):
    if loader == "class":
        model = hf_moe.HyperRouterForCausalLM.from_pretrained(saved_hyperrouter)
    else:
        model = AutoModelForCausalLM.from_pretrained(saved_hyperrouter)
        if loader == "auto_resized":
            model.resize_token_embeddings(VOCAB + 8)
            assert model.get_input_embeddings().weight.shape[0] == VOCAB + 8
    assert type(model) is hf_moe.HyperRouterForCausalLM
    assert_hypernet_frozen(*one_adamw_step(model, llama_inputs()))


def test_hypernet_frozen_in_peft_modules_to_save(saved_hyperrouter):
    """`modules_to_save` makes a trainable copy of each router: the copy's hypernetwork must stay frozen too."""
    model = AutoModelForCausalLM.from_pretrained(saved_hyperrouter)
    peft_model = get_peft_model(model, moe_lora_config(model, task_type="CAUSAL_LM"))
    assert any(".modules_to_save.default.hypernet." in key for key in peft_model.state_dict())
    assert_hypernet_frozen(*one_adamw_step(peft_model, llama_inputs()))


REMOTE_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForCausalLM

    folder, inputs_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).train()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert not any(name.split(".")[0] == "hf_moe" for name in sys.modules), "hf_moe was imported"
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    before = {key: value.detach().clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(**torch.load(inputs_path)).loss.backward()
    optimizer.step()
    torch.save({"trainable": trainable, "before": before, "after": model.state_dict()}, out_path)
    """
)


def test_hypernet_frozen_after_trust_remote_code(saved_hyperrouter, tmp_path):
    torch.save(llama_inputs(), tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_CHILD, str(saved_hyperrouter), "inputs.pt", "out.pt"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    out = torch.load(tmp_path / "out.pt")
    assert_hypernet_frozen(out["trainable"], out["before"], out["after"])


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    config = {k: v for k, v in text_config("llama").items() if k != "model_type"}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(folder)
    return folder


def test_hypernet_frozen_after_upcycling(dense_llama, tmp_path):
    out = upcycle(dense_llama, tmp_path / "moe", "hyperrouter", num_experts=4, num_experts_per_tok=2, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is hf_moe.HyperRouterForCausalLM
    assert_hypernet_frozen(*one_adamw_step(model, llama_inputs()))

    in_memory = upcycle_model(LlamaForCausalLM.from_pretrained(dense_llama), "hyperrouter", num_experts=4)
    assert_hypernet_frozen(*one_adamw_step(in_memory, llama_inputs()))


# ------------------------------------------------------------------------------------ 4. non-finite padding

# (test family, overrides): every family, MH-MoE's sub-tokens, capacity drops, transformers' experts backend
NON_FINITE_CASES = [
    pytest.param("topk", {}, id="topk"),
    pytest.param("topk", {"expert_capacity_factor": 1.0}, id="topk-capacity"),
    pytest.param("topk", {"experts_implementation": "batched_mm"}, id="topk-batched_mm"),
    pytest.param("hypermoe", {}, id="hypermoe"),
    pytest.param("hyperrouter", {}, id="hyperrouter"),
    pytest.param("mh2", {}, id="mh2"),
    pytest.param("dynamic", {"router_top_p": 0.75}, id="dynamic"),
]
STATISTICS = ("aux_loss", "z_loss", "entropy_loss", "expert_load", "mean_experts_per_token")


@pytest.mark.parametrize("family, overrides", NON_FINITE_CASES)
def test_non_finite_padding_reaches_no_statistic(family, overrides):
    """NaN and ±Inf at padded positions of a layer's input: every statistic equals the float64 per-token reference
    over the real tokens only (padding zeroed there), and the real tokens' outputs are those of that reference."""
    layer, gen, act_name = make_layer(family, num_experts=4, top_k=2, **overrides)
    x, mask = make_inputs(padded=True)
    padding = mask == 0  # four positions
    clean = x.masked_fill(padding[..., None], 0.0)
    poisoned = clean.clone()
    positions = padding.nonzero().tolist()
    for (b, s), value in zip(positions, (float("nan"), float("inf"), -float("inf"))):
        poisoned[b, s] = value
    b, s = positions[-1]
    poisoned[b, s, 0] = float("nan")  # the last one: a single NaN among finite values
    with torch.no_grad():
        got = as_dict(layer(poisoned, mask))
    ref = reference_layer(layer, FAMILIES[family][0], clean, mask, act_name, gen)
    for key in STATISTICS:
        assert torch.isfinite(got[key]).all(), f"{key} is not finite: {got[key]}"
        torch.testing.assert_close(got[key], ref[key].to(got[key].dtype), rtol=1e-9, atol=1e-12, msg=key)
    real = ~padding
    assert torch.isfinite(got["hidden_states"][real]).all()
    torch.testing.assert_close(got["hidden_states"][real], ref["hidden_states"][real], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------ 7. clear errors


@pytest.mark.parametrize("family", ["TopKMoe", "HyperMoe", "HyperRouter", "MultiHeadMoe"])
@pytest.mark.parametrize("top_k", [5, 10, 0])
def test_num_experts_per_tok_out_of_range_at_run_time_names_the_field(family, top_k):
    model = make_model(family, "llama", "ForCausalLM")  # 4 experts
    model.config.num_experts_per_tok = top_k  # the config is mutable (HyperRouter's k schedule changes it)
    with pytest.raises(
        ValueError, match=re.escape(f"num_experts_per_tok={top_k}") + r".*between 1 and num_experts \(4\)"
    ):
        model(**llama_inputs())
    model.config.num_experts_per_tok = 4
    assert torch.isfinite(model(**llama_inputs()).loss)


@pytest.mark.parametrize("family", ["TopKMoe", "HyperMoe", "HyperRouter", "MultiHeadMoe", "DynamicMoe"])
def test_moe_layer_frequency_beyond_the_layer_count_is_refused(family):
    config_class = hf_moe.MODEL_CLASSES[family, "Model"].config_class
    with pytest.raises(ValueError, match=r"moe_layer_frequency=3 .*2 layers.*moe_layers"):
        config_class(text_config=text_config("llama"), moe_layer_frequency=3)
    config = config_class(text_config=text_config("llama"), moe_layer_frequency=2)
    assert [i for i in range(2) if config.is_moe_layer(i)] == [1]


def test_every_stack_of_an_encoder_decoder_gets_an_moe_layer():
    """T5 applies one setting to both stacks; a shorter decoder must not end up without an MoE layer."""
    t5 = text_config("t5", num_layers=4, num_decoder_layers=2)
    with pytest.raises(ValueError, match=r"moe_layer_frequency=3 .*decoder \(2 layers\)"):
        hf_moe.TopKMoeConfig(text_config=t5, moe_layer_frequency=3)
    with pytest.raises(ValueError, match=r"moe_layers=\[2, 3\] .*decoder \(2 layers\)"):
        hf_moe.HyperMoeConfig(text_config=t5, moe_layers=[2, 3])
    model = hf_moe.TopKMoeForConditionalGeneration(hf_moe.TopKMoeConfig(text_config=t5, moe_layer_frequency=2))
    assert sorted((b.stack, b.moe.layer_idx) for b in model.moe_blocks()) == [
        ("decoder", 1), ("encoder", 1), ("encoder", 3)
    ]


# ------------------------------------------------------------------------------------ 8. HyperMoE with many experts


@pytest.mark.parametrize("num_experts, top_k, capacity", [(128, 2, None), (128, 3, None), (128, 2, 0.5)])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_hypermoe_beyond_63_experts_matches_per_token_reference(num_experts, top_k, capacity, padded):
    """Outputs, losses and every gradient against per-token generation (the sets: before capacity drops)."""
    layer, gen, act_name = make_layer(
        "hypermoe", num_experts=num_experts, top_k=top_k, ffn_kind="biased_gelu", expert_capacity_factor=capacity
    )
    x, mask = make_inputs(padded=padded, batch=3, seq=6)
    x[2] = x[0]  # repeated tokens share a set
    _, ref = check_against_reference(layer, gen, act_name, "hypermoe", x, mask)
    assert max(max(s) for s in ref["selections"]) >= 64, "no expert beyond an int64 bitmask was selected"
    distinct = {tuple(sorted(s)) for s in ref["selections"]}
    assert 1 < len(distinct) < len(ref["selections"]), "want several sets, some shared by several tokens"
    if capacity is not None:
        assert not all(all(row) for row in ref["keep"]), "the capacity should drop some slots"
