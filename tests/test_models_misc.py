"""Model-level behaviour: router losses recomputed from the returned router logits, padding, tied embeddings, errors,
experts implementations, gradient checkpointing and embedding resizing."""

import pytest
import torch
from models_common import (
    AUTO_CLASS,
    FAMILIES,
    backbone_of,
    dropout_free,
    make_config,
    make_inputs,
    make_model,
    model_depth,
    random_ids,
    task_loss,
)
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_moe

pytestmark = pytest.mark.usefixtures("single_thread")

# ------------------------------------------------------------------ router losses, written out from the router logits


def _selection(probs, family, config):
    """[T, E] 0/1: the experts each token (or MH sub-token) uses, by the routing rule of methods.md §1 and §5."""
    num_experts = probs.shape[-1]
    if family == "DynamicMoe":
        sorted_probs, order = probs.sort(-1, descending=True)
        # the shortest prefix whose mass exceeds p (all experts if none does)
        count = ((sorted_probs.cumsum(-1) <= config.router_top_p).sum(-1) + 1).clamp(max=num_experts)
        keep = torch.arange(num_experts)[None, :] < count[:, None]
        return torch.zeros_like(probs).scatter(1, order, keep.to(probs.dtype))
    index = probs.topk(config.num_experts_per_tok, dim=-1).indices
    return torch.zeros_like(probs).scatter(1, index, 1.0)


def _router_terms(router_logits, real, family, config):
    """Per layer: balance E * sum_e f_e * mean P_e, z-loss mean logsumexp^2, entropy mean -sum P log P (real tokens)."""
    balance, z, entropy = [], [], []
    for logits in router_logits:
        logits = logits.double()
        rows = real
        if logits.shape[0] != real.shape[0]:  # MH-MoE: h adjacent sub-tokens per token
            rows = real.repeat_interleave(logits.shape[0] // real.shape[0])
        logits = logits[rows]
        probs = logits.softmax(-1)
        chosen = _selection(probs, family, config)
        balance.append(probs.shape[-1] * (chosen.mean(0) * probs.mean(0)).sum())
        z.append((torch.logsumexp(logits, -1) ** 2).mean())
        entropy.append(-(probs * probs.clamp_min(1e-300).log()).sum(-1).mean())
    return sum(balance), sum(z), sum(entropy)


def _padded_bert_batch(head="ForSequenceClassification"):
    inputs = make_inputs("bert", head, seed=21)
    inputs["attention_mask"][0, -3:] = 0
    inputs["attention_mask"][1, -1:] = 0
    inputs["input_ids"][inputs["attention_mask"] == 0] = 0
    return inputs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backbone, head", [("bert", "ForSequenceClassification"), ("llama", "ForCausalLM")])
def test_aux_z_entropy_losses_match_router_logits(family, backbone, head):
    extra = {"router_z_loss_coef": 0.05, "router_aux_loss_coef": 0.1}
    if family == "DynamicMoe":
        extra["router_entropy_loss_coef"] = 0.02
    model = make_model(family, backbone, head, **extra).eval()
    inputs = _padded_bert_batch(head) if backbone == "bert" else make_inputs(backbone, head, seed=21)
    out = model(**inputs, output_router_logits=True)
    real = inputs["attention_mask"].reshape(-1).bool()
    balance, z, entropy = _router_terms(out.router_logits, real, family, model.config)
    torch.testing.assert_close(out.aux_loss.double(), balance, rtol=1e-5, atol=1e-6)
    expected = task_loss(head, out, inputs).double() + 0.1 * balance + 0.05 * z
    if family == "DynamicMoe":
        expected = expected + 0.02 * entropy
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    if backbone == "bert":  # padding really is left out: counting it gives another balance loss
        with_padding, _, _ = _router_terms(out.router_logits, torch.ones_like(real), family, model.config)
        assert abs(with_padding.item() - balance.item()) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_losses_of_a_bert_encoder(family, assert_fp32_close):
    extra = {"router_z_loss_coef": 0.05}
    if family == "DynamicMoe":
        extra["router_entropy_loss_coef"] = 0.02
    model = make_model(family, "bert", "ForSequenceClassification", **extra).eval()
    ids = random_ids((1, 6), seed=31)
    labels = torch.tensor([1])
    with torch.no_grad():
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, output_router_logits=True)
        padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
        mask = (padded_ids != 0).long()
        padded = model(input_ids=padded_ids, attention_mask=mask, labels=labels, output_router_logits=True)
    # BERT attends only to real tokens, so their hidden states (and router logits) are unchanged by padding
    depth = model_depth(model)
    for a, p in zip(alone.router_logits, padded.router_logits, strict=True):
        rows = mask.reshape(-1).bool().repeat_interleave(p.shape[0] // mask.numel())
        assert_fp32_close(p[rows], a, depth, "router logits")
    for name in ("logits", "aux_loss", "loss"):
        assert_fp32_close(padded[name], alone[name], depth, name)


# ---------------------------------------------------------------------------------------------- tied embeddings


def _checkpoint_keys(directory):
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_tied_embeddings_stay_tied_after_save_and_load(family, backbone, tmp_path, assert_fp32_close):
    model = make_model(family, backbone, "ForCausalLM", text_overrides={"tie_word_embeddings": True}).eval()
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    assert not any("lm_head" in k for k in _checkpoint_keys(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    embedding, lm_head = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    assert embedding.data_ptr() == lm_head.data_ptr()
    torch.testing.assert_close(lm_head, model.get_output_embeddings().weight, rtol=0, atol=0)
    ids = random_ids((2, 6), seed=41)
    with torch.no_grad():
        assert_fp32_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, model_depth(model), "logits")


def test_untied_llama_keeps_its_own_lm_head(tmp_path):
    model = make_model("TopKMoe", "llama", "ForCausalLM", text_overrides={"tie_word_embeddings": False})
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    assert any("lm_head" in k for k in _checkpoint_keys(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.get_input_embeddings().weight.data_ptr() != loaded.get_output_embeddings().weight.data_ptr()
    torch.testing.assert_close(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight)


@pytest.mark.parametrize(
    "head", ["Model", "ForConditionalGeneration", "ForSequenceClassification", "ForQuestionAnswering"]
)
def test_t5_shared_embeddings_stay_tied_after_save_and_load(head, tmp_path):
    # T5 ties shared, encoder.embed_tokens and decoder.embed_tokens; the checkpoint stores the shared matrix once
    model = make_model("TopKMoe", "t5", head).eval()
    base = backbone_of(model).base_model  # the T5Model (or the head itself for ForConditionalGeneration)
    assert base.encoder.embed_tokens.weight.data_ptr() == base.shared.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AUTO_CLASS[head].from_pretrained(tmp_path).eval()
    loaded_base = backbone_of(loaded).base_model
    for stack in ("encoder", "decoder"):
        weight = getattr(loaded_base, stack).embed_tokens.weight
        assert torch.equal(weight, base.shared.weight), f"{stack}.embed_tokens was not restored"
        assert weight.data_ptr() == loaded_base.shared.weight.data_ptr(), f"{stack}.embed_tokens is not tied"


# ------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("family", FAMILIES)
def test_unsupported_backbone_raises_naming_supported_ones(family):
    config_class = hf_moe.MODEL_CLASSES[family, "Model"].config_class
    with pytest.raises(ValueError, match="gptj") as error:
        config_class(text_config={"model_type": "gptj", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 100})
    for name in ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "qwen3", "t5"):
        assert name in str(error.value)


@pytest.mark.parametrize(
    "family, backbone, head",
    [
        ("TopKMoe", "llama", "ForMaskedLM"),
        ("HyperMoe", "gpt2", "ForMultipleChoice"),
        ("HyperRouter", "t5", "ForCausalLM"),
        ("MultiHeadMoe", "bert", "ForConditionalGeneration"),
        ("DynamicMoe", "qwen2", "ForConditionalGeneration"),
    ],
)
def test_head_the_backbone_lacks_raises(family, backbone, head):
    config = make_config(family, backbone)
    with pytest.raises(ValueError, match=backbone):
        hf_moe.MODEL_CLASSES[family, head](config)


# -------------------------------------------------------------------------------------- experts implementations


def _ops(model, inputs):
    """Operator name -> number of calls in one forward."""
    with torch.profiler.profile() as prof, torch.no_grad():
        model(**inputs)
    return {event.key: event.count for event in prof.key_averages()}


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backbone", ["llama", "bert", "t5"])  # gated, biased and plain experts
def test_grouped_and_batched_mm_match_eager(family, backbone, tmp_path, assert_fp32_close):
    head = "ForSequenceClassification"
    model = make_model(family, backbone, head, text_overrides=dropout_free(backbone)).eval()
    assert model.config._experts_implementation == "eager"
    inputs = make_inputs(backbone, head, seed=51)
    inputs["attention_mask"][0, -2:] = 0  # padding and, for top-p, sentinel slots
    with torch.no_grad():
        eager = model(**inputs)
    eager_grads = _grads(model, inputs)
    # our eager counts pairs per expert with bincount, transformers' grouped_mm with histc: which one ran is visible
    eager_ops = _ops(model, inputs)
    assert eager_ops.get("aten::bincount", 0) > 0 and eager_ops.get("aten::histc", 0) == 0

    model.save_pretrained(tmp_path)
    loaded = AUTO_CLASS[head].from_pretrained(tmp_path, experts_implementation="grouped_mm").eval()
    assert loaded.config._experts_implementation == "grouped_mm"
    assert _ops(loaded, inputs).get("aten::histc", 0) > 0
    with torch.no_grad():
        out = loaded(**inputs)
    depth = model_depth(model)
    assert_fp32_close(out.logits, eager.logits, depth, "grouped_mm logits")
    assert_fp32_close(out.loss, eager.loss, depth, "grouped_mm loss")

    for impl, op in (("grouped_mm", "aten::histc"), ("batched_mm", "aten::bmm")):
        model.set_experts_implementation(impl)
        assert model.config._experts_implementation == impl
        assert _ops(model, inputs).get(op, 0) > eager_ops.get(op, 0)
        with torch.no_grad():
            out = model(**inputs)
        assert_fp32_close(out.logits, eager.logits, depth, f"{impl} logits")
        grads = _grads(model, inputs)
        assert grads.keys() == eager_grads.keys()
        for name, grad in grads.items():  # backward runs the layers a second time
            assert_fp32_close(grad, eager_grads[name], 2 * depth, f"{impl} grad {name}")
    model.set_experts_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, eager.logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- gradient checkpointing


def _checkpointing_case(family, backbone, head, inputs, assert_fp32_close, **checkpointing_kwargs):
    model = make_model(family, backbone, head, text_overrides=dropout_free(backbone)).train()
    calls = []
    # pre-hooks: checkpoint recomputation stops early, inside the last MoE forward, so forward hooks may not fire
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.modules() if hasattr(m, "moe")]
    plain = _grads(model, inputs)
    plain_calls = len(calls)
    model.gradient_checkpointing_enable(**checkpointing_kwargs)
    assert model.is_activation_checkpointing
    calls.clear()
    checkpointed = _grads(model, inputs)
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2 * plain_calls, "the MoE blocks were not recomputed in backward"
    assert checkpointed.keys() == plain.keys()
    for name, grad in plain.items():
        assert_fp32_close(checkpointed[name], grad, 2 * model_depth(model), f"grad {name}")


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backbone, head", [("bert", "ForSequenceClassification"), ("llama", "ForCausalLM")])
def test_gradient_checkpointing_gives_the_same_gradients(family, backbone, head, assert_fp32_close):
    # transformers' default (non-reentrant) checkpointing, with the attention mask every real batch (and Trainer) has
    _checkpointing_case(family, backbone, head, make_inputs(backbone, head, seed=61), assert_fp32_close)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_without_attention_mask(family, assert_fp32_close):
    inputs = make_inputs("llama", "ForCausalLM", seed=61)
    del inputs["attention_mask"]
    _checkpointing_case(family, "llama", "ForCausalLM", inputs, assert_fp32_close)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
def test_reentrant_gradient_checkpointing_is_refused_with_the_fix():
    # reentrant checkpointing runs the first forward without autograd, so the router losses would silently lose
    # their gradient: the model refuses and names the fix
    inputs = make_inputs("llama", "ForCausalLM", seed=61)
    model = make_model("TopKMoe", "llama", "ForCausalLM", text_overrides=dropout_free("llama")).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant': False"):
        model(**inputs)


# ------------------------------------------------------------------------------------------------ resizing


@pytest.mark.parametrize("family", ["TopKMoe", "HyperMoe"])
@pytest.mark.parametrize("backbone, head", [("bert", "ForMaskedLM"), ("llama", "ForCausalLM")])
def test_resize_token_embeddings(family, backbone, head, tmp_path, assert_fp32_close):
    model = make_model(family, backbone, head).eval()
    old = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    ids = random_ids((2, 6), seed=71)
    with torch.no_grad():
        before = model(input_ids=ids).logits

    model.resize_token_embeddings(120)
    assert model.get_input_embeddings().weight.shape == (120, 32)
    assert model.get_output_embeddings().weight.shape[0] == 120
    assert model.config.text_config.vocab_size == 120
    assert backbone_of(model).config.vocab_size == 120
    torch.testing.assert_close(model.get_input_embeddings().weight[:100], old, rtol=0, atol=0)
    torch.testing.assert_close(model.get_output_embeddings().weight[:100], old_out, rtol=0, atol=0)
    with torch.no_grad():
        after = model(input_ids=ids).logits
        assert_fp32_close(after[..., :100], before, model_depth(model), "logits after resizing")
        new_ids = ids.clone()
        new_ids[:, 2] = 115
        logits = model(input_ids=new_ids, labels=new_ids).logits
    assert logits.shape[-1] == 120

    model.save_pretrained(tmp_path)
    loaded = AUTO_CLASS[head].from_pretrained(tmp_path).eval()
    assert loaded.get_input_embeddings().weight.shape == (120, 32)
    with torch.no_grad():
        assert_fp32_close(loaded(input_ids=new_ids).logits, logits, model_depth(model), "reloaded logits")

