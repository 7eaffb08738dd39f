"""Transformers' model contract, checked for every family over tiny llama (`ForCausalLM`, `Model`) and bert (`Model`,
`ForSequenceClassification`, `ForMaskedLM`) backbones: what transformers' common model tests check for a model of
its own (generation is in test_conformance_generation.py). References are the dense transformers model's behaviour,
a second computation of the same function, or a property written out in the test.

Inapplicable checks (transformers' common tests that do not apply to a wrapper of a dense backbone, and why):
- Checks of a flat `model.layers` of the model's own decoder-layer class (`_no_split_modules` built from that class,
  pipeline-parallel `_pp_plan` layer lists, layer-count and per-layer-type config checks,
  `_checkpoint_conversion_mapping` of the model's own keys): the layers are the backbone's; the MoE block sits inside
  each of them, so `_no_split_modules` is the backbone's list and the layer semantics are transformers' own.
- Device-map, multi-GPU and offload checks (`device_map="auto"`, disk/CPU offload, data parallel) and flash/flex
  attention dispatch: they need accelerators; the attention and the KV cache are the backbone's own code.
- Contrastive search, DoLa, group and constrained beam search: transformers 5.24 no longer ships them (each is a Hub
  `custom_generate` repository), so an offline suite cannot run them; every shipped mode is tested.
- Encoder-decoder checks (cross-attentions, `decoder_*` outputs): bert and llama have no decoder stack; T5 is covered
  by tests/test_models*.py.
- Repository-layout checks of transformers itself (auto-mapping names, modular-file conversion, documentation
  pages): they describe transformers' source tree, not a plugin's.
- Quantized-cache generation: needs optional quantization packages and touches only the backbone's cache.
- Reentrant gradient checkpointing (`use_reentrant=True`): refused with an error naming the fix, because its first
  forward runs without autograd and the router losses computed there would silently lose their gradient
  (tests/test_models_misc.py); the default, non-reentrant checkpointing is tested here.
- Applying tensor/expert parallel plans (`tp_plan="auto"`, `ep_size > 1`): needs several processes and devices; what
  a single CPU can check, that every rule matches the model's parameters, is tested here.
"""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from models_common import (
    AUTO_CLASS,
    FAMILIES,
    backbone_of,
    dropout_free,
    main_tensor,
    make_inputs,
    make_model,
    model_depth,
    random_ids,
    text_config,
)
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from transformers import AutoConfig, AutoModel, PreTrainedModel

import hf_moe

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH, SEQ, PAD = 2, 8, 0
LM_CASES = [("llama", "ForCausalLM"), ("bert", "ForMaskedLM")]
ALL_CASES = LM_CASES + [("bert", "Model"), ("bert", "ForSequenceClassification"), ("llama", "Model")]


def _cases(cases):
    return [pytest.param(f, b, h, id=f"{f}-{b}-{h}") for f in FAMILIES for b, h in cases]


def _model(family, backbone, head, **kwargs):
    return make_model(family, backbone, head, text_overrides=dropout_free(backbone), **kwargs).eval()


def _padded_batch(backbone, seed=0, batch=BATCH, seq=SEQ):
    """Token ids and 2-D mask with padding in the last row: left padding for llama (as generate pads), right for
    bert."""
    ids = random_ids((batch, seq), seed)
    mask = torch.ones_like(ids)
    pad = seq // 3
    if backbone == "llama":
        mask[-1, :pad] = 0
    else:
        mask[-1, -pad:] = 0
    ids[mask == 0] = PAD
    return {"input_ids": ids, "attention_mask": mask}


def _forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


def _real(tensor, mask):
    """The rows of `tensor` [B, S, ...] at the real (mask 1) tokens."""
    return tensor[mask.bool()]


# ------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("family, backbone, head", _cases(ALL_CASES[:3]))
def test_save_load_round_trip_in_every_safetensors_layout(family, backbone, head, tmp_path, assert_fp32_close):
    model = _model(family, backbone, head)
    inputs = _padded_batch(backbone, seed=1)
    expected = _forward(model, inputs)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    model.save_pretrained(tmp_path / "variant", variant="v1")

    assert (tmp_path / "single" / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*/*.bin")), "a pickle checkpoint was written"
    assert (tmp_path / "variant" / "model.v1.safetensors").is_file()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "sharded" / shard).is_file() for shard in shards)

    state = model.state_dict()
    for folder, kwargs in (("single", {}), ("sharded", {}), ("variant", {"variant": "v1"})):
        loaded, info = AUTO_CLASS[head].from_pretrained(tmp_path / folder, output_loading_info=True, **kwargs)
        assert type(loaded) is type(model)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (folder, info)
        loaded_state = loaded.state_dict()
        assert loaded_state.keys() == state.keys()
        for name, tensor in state.items():  # a copy, bit for bit
            assert torch.equal(loaded_state[name], tensor), f"{folder}: {name}"
        out = _forward(loaded.eval(), inputs)
        depth = model_depth(model)
        assert_fp32_close(main_tensor(head, out), main_tensor(head, expected), depth, f"{folder} output")
        assert_fp32_close(out.aux_loss, expected.aux_loss, depth, f"{folder} aux_loss")


# ------------------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("family, backbone, head", _cases(LM_CASES))
def test_resize_token_embeddings_up_and_down(family, backbone, head, tmp_path, assert_fp32_close):
    model = _model(family, backbone, head)
    vocab = model.config.text_config.vocab_size
    embeddings = model.get_input_embeddings().weight.detach().clone()
    ids = random_ids((BATCH, SEQ), seed=2, high=90)
    before = _forward(model, {"input_ids": ids}).logits
    depth = model_depth(model)

    grown = 128  # vocab + 20 rounded up to a multiple of 64
    model.resize_token_embeddings(vocab + 20, pad_to_multiple_of=64)
    assert model.get_input_embeddings().weight.shape[0] == grown
    assert model.get_output_embeddings().weight.shape[0] == grown
    assert model.config.text_config.vocab_size == grown and backbone_of(model).config.vocab_size == grown
    assert torch.equal(model.get_input_embeddings().weight[:vocab], embeddings)
    if model.config.text_config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    after = _forward(model, {"input_ids": ids}).logits
    assert after.shape[-1] == grown
    assert_fp32_close(after[..., :vocab], before, depth, "logits after growing")

    model.save_pretrained(tmp_path)
    loaded = AUTO_CLASS[head].from_pretrained(tmp_path).eval()
    assert loaded.get_input_embeddings().weight.shape[0] == grown
    assert_fp32_close(_forward(loaded, {"input_ids": ids}).logits, after, depth, "reloaded logits")

    model.resize_token_embeddings(90)
    assert model.get_input_embeddings().weight.shape[0] == 90 and model.config.text_config.vocab_size == 90
    assert_fp32_close(_forward(model, {"input_ids": ids}).logits, before[..., :90], depth, "logits after shrinking")


# ------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("family, backbone, head", _cases(ALL_CASES))
def test_output_attentions_and_hidden_states(family, backbone, head):
    model = _model(family, backbone, head)
    model.set_attn_implementation("eager")  # attention probabilities exist only in eager attention
    inputs = _padded_batch(backbone, seed=3)
    plain = _forward(model, inputs)
    out = _forward(model, inputs, output_attentions=True, output_hidden_states=True)
    config = model.config.text_config
    layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    assert torch.equal(main_tensor(head, out), main_tensor(head, plain)), "the output flags changed the output"

    assert len(out.hidden_states) == layers + 1  # embeddings, then every layer
    assert all(h.shape == (BATCH, SEQ, hidden) for h in out.hidden_states)
    assert len(out.attentions) == layers
    real = inputs["attention_mask"].bool()
    unreadable = ~real[:, None, :].expand(-1, SEQ, -1)  # [B, query, key]: padding keys
    if backbone == "llama":  # causal: later keys too
        unreadable = unreadable | torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    for probs in out.attentions:
        assert probs.shape == (BATCH, heads, SEQ, SEQ)
        # each real query reads no padding (or later) key, and its probabilities sum to one
        rows = probs.transpose(1, 2)[real]  # [real queries, heads, keys]
        assert rows.masked_select(unreadable[real][:, None, :]).abs().max() == 0
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]))


@pytest.mark.parametrize("family, backbone, head", _cases(ALL_CASES[:4]))
def test_return_dict_false_and_inputs_embeds_give_the_same_outputs(family, backbone, head, assert_fp32_close):
    model = _model(family, backbone, head)
    inputs = _padded_batch(backbone, seed=4)
    expected = _forward(model, inputs)
    as_tuple = _forward(model, inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    reference = expected.to_tuple()
    assert len(as_tuple) == len(reference)
    for got, want in zip(as_tuple, reference):
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want)

    embeds = model.get_input_embeddings()(inputs["input_ids"])
    from_embeds = _forward(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
    depth = model_depth(model)
    assert_fp32_close(main_tensor(head, from_embeds), main_tensor(head, expected), depth, "inputs_embeds output")
    assert_fp32_close(from_embeds.aux_loss, expected.aux_loss, depth, "inputs_embeds aux_loss")


# ------------------------------------------------------------------------------------------- attention backends


@pytest.mark.parametrize("family, backbone, head", _cases(ALL_CASES[:3]))
def test_sdpa_matches_eager_attention(family, backbone, head, tmp_path, assert_fp32_close):
    model = _model(family, backbone, head)
    assert model.config._attn_implementation == "sdpa"
    assert backbone_of(model).config._attn_implementation == "sdpa"
    inputs = _padded_batch(backbone, seed=5)
    sdpa = _forward(model, inputs)
    model.save_pretrained(tmp_path)

    model.set_attn_implementation("eager")
    loaded = AUTO_CLASS[head].from_pretrained(tmp_path, attn_implementation="eager").eval()
    depth, mask = model_depth(model), inputs["attention_mask"]
    for name, eager_model in (("set_attn_implementation", model), ("from_pretrained", loaded)):
        # the switch reaches the backbone's attention layers, which read the backbone's config
        assert backbone_of(eager_model).config._attn_implementation == "eager", name
        eager = _forward(eager_model, inputs)
        got, want = main_tensor(head, eager), main_tensor(head, sdpa)
        assert_fp32_close(_real(got, mask), _real(want, mask), depth, f"{name}: output on real tokens")
        assert_fp32_close(eager.aux_loss, sdpa.aux_loss, depth, f"{name}: aux_loss")


# ------------------------------------------------------------------------------------------- 4-D attention masks


def _four_d(mask_2d, causal: bool, dtype):
    """The [B, 1, S, S] mask equivalent to a 2-D padding mask: bool (True = attend) or additive float."""
    seq = mask_2d.shape[-1]
    allowed = mask_2d.bool()[:, None, None, :].expand(-1, 1, seq, -1)
    if causal:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool).tril()
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "float"])
@pytest.mark.parametrize("family, backbone, head", _cases(ALL_CASES[:3]))
def test_4d_attention_mask_equals_the_2d_mask(family, backbone, head, dtype, assert_fp32_close):
    model = _model(family, backbone, head)
    inputs = _padded_batch(backbone, seed=6)
    mask = inputs["attention_mask"]
    expected = _forward(model, inputs)
    out = _forward(model, {**inputs, "attention_mask": _four_d(mask, backbone == "llama", dtype)})
    depth = model_depth(model)
    got, want = main_tensor(head, out), main_tensor(head, expected)
    assert_fp32_close(_real(got, mask), _real(want, mask), depth, "output on real tokens")
    # the router statistics count the same real tokens as with the 2-D mask
    assert_fp32_close(out.aux_loss, expected.aux_loss, depth, "aux_loss")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequences_with_a_block_diagonal_4d_mask_equal_separate_rows(family, assert_fp32_close):
    # packed-sequence training: two sequences in one row, each attending only to itself, positions restarting
    model = _model(family, "llama", "ForCausalLM")
    first, second = random_ids((1, 5), seed=7), random_ids((1, 5), seed=8)
    packed = torch.cat([first, second], dim=1)
    block = torch.block_diag(torch.ones(5, 5), torch.ones(5, 5)).bool() & torch.ones(10, 10, dtype=torch.bool).tril()
    position_ids = torch.cat([torch.arange(5), torch.arange(5)])[None]
    out = _forward(model, {"input_ids": packed, "attention_mask": block[None, None], "position_ids": position_ids})
    separate = _forward(model, {"input_ids": torch.cat([first, second]), "attention_mask": torch.ones(2, 5)})
    depth = model_depth(model)
    assert_fp32_close(out.logits[0], separate.logits.reshape(10, -1), depth, "packed logits")
    # the same ten tokens, so the same router statistics
    assert_fp32_close(out.aux_loss, separate.aux_loss, depth, "packed aux_loss")


# ------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    "family, backbone, head", _cases([("llama", "ForCausalLM"), ("bert", "ForSequenceClassification")])
)
def test_a_row_alone_equals_the_same_row_in_a_padded_batch(family, backbone, head, assert_fp32_close):
    model = _model(family, backbone, head)
    inputs = _padded_batch(backbone, seed=9, batch=3)
    batched = _forward(model, inputs)
    depth = model_depth(model)
    for row in range(3):
        real = inputs["attention_mask"][row].bool()
        ids = inputs["input_ids"][row, real][None]
        alone = _forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        if head == "ForSequenceClassification":
            assert_fp32_close(batched.logits[row], alone.logits[0], depth, f"row {row} logits")
        else:
            assert_fp32_close(batched.logits[row, real], alone.logits[0], depth, f"row {row} logits")


@pytest.mark.parametrize("family", FAMILIES)
def test_feed_forward_chunking_changes_nothing(family, assert_fp32_close):
    # bert runs its FFN slot (our MoE block) on sequence chunks when `chunk_size_feed_forward` is set
    inputs = _padded_batch("bert", seed=10)
    model = _model(family, "bert", "Model")
    expected = _forward(model, inputs)
    chunked = make_model(
        family, "bert", "Model", text_overrides={**dropout_free("bert"), "chunk_size_feed_forward": SEQ // 2}
    ).eval()
    chunked.load_state_dict(model.state_dict())
    out = _forward(chunked, inputs)
    depth, mask = model_depth(model), inputs["attention_mask"]
    got, want = out.last_hidden_state, expected.last_hidden_state
    assert_fp32_close(_real(got, mask), _real(want, mask), depth, "chunked output on real tokens")
    assert_fp32_close(out.aux_loss, expected.aux_loss, depth, "chunked aux_loss")


# ------------------------------------------------------------------------------------------- training


def _grads(model, inputs):
    model.zero_grad()
    model(**inputs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("family, backbone, head", _cases(LM_CASES))
def test_gradient_checkpointing_gives_the_same_gradients(family, backbone, head, assert_fp32_close):
    model = _model(family, backbone, head).train()
    inputs = make_inputs(backbone, head, seed=11)
    moe_calls = []
    for module in model.modules():  # pre-hooks: recomputation may stop inside the last block, before its post-hook
        if isinstance(module, hf_moe.modeling.MoeFeedForward):
            module.register_forward_pre_hook(lambda *_: moe_calls.append(1))
    plain = _grads(model, inputs)
    plain_calls = len(moe_calls)
    model.gradient_checkpointing_enable()
    moe_calls.clear()
    checkpointed = _grads(model, inputs)
    assert len(moe_calls) == 2 * plain_calls, "the MoE blocks were not recomputed in backward"
    assert checkpointed.keys() == plain.keys() and any(".router." in name for name in plain)
    for name, grad in plain.items():
        assert_fp32_close(checkpointed[name], grad, 2 * model_depth(model), f"grad {name}")


# ------------------------------------------------------------------------------------------- compile and export


def _llama_grouped_mm(family):
    model = _model(family, "llama", "ForCausalLM")
    model.set_experts_implementation("grouped_mm")
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_fullgraph_exactly_where_declared(family, assert_fp32_close):
    """`_can_compile_fullgraph` is declared exactly where the forward (grouped_mm experts) compiles as one graph."""
    model = _llama_grouped_mm(family)
    inputs = _padded_batch("llama", seed=12)
    expected = _forward(model, inputs, use_cache=False)
    torch._dynamo.reset()
    try:  # aot_eager: dynamo capture and AOTAutograd without inductor's code generation
        out = _forward(torch.compile(model, fullgraph=True, backend="aot_eager"), inputs, use_cache=False)
    except (torch._dynamo.exc.Unsupported, GuardOnDataDependentSymNode) as error:  # graph break, data-dependent shape
        out = error
    whole_graph = not isinstance(out, Exception)
    assert model._can_compile_fullgraph == whole_graph, (
        f"{family}: one graph: {whole_graph} ({out if not whole_graph else ''})"
    )
    if family == "TopKMoe":
        assert whole_graph, f"the top-k family must compile as one graph with grouped_mm experts: {out}"
    if whole_graph:
        depth = model_depth(model)
        assert_fp32_close(out.logits, expected.logits, depth, "compiled logits")
        assert_fp32_close(out.aux_loss, expected.aux_loss, depth, "compiled aux_loss")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_with_inductor(family, assert_fp32_close):
    # with graph breaks where the family does not declare `_can_compile_fullgraph`
    model = _llama_grouped_mm(family)
    inputs = _padded_batch("llama", seed=13)
    expected = _forward(model, inputs, use_cache=False)
    torch._dynamo.reset()
    out = _forward(torch.compile(model, fullgraph=model._can_compile_fullgraph), inputs, use_cache=False)
    depth = model_depth(model)
    assert_fp32_close(out.logits, expected.logits, depth, "inductor logits")
    assert_fp32_close(out.aux_loss, expected.aux_loss, depth, "inductor aux_loss")


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_of_the_forward(family, assert_fp32_close):
    model = _llama_grouped_mm(family)
    inputs = {**_padded_batch("llama", seed=14), "use_cache": False}
    expected = _forward(model, inputs)
    with torch.no_grad():
        program = torch.export.export(model, args=(), kwargs=inputs)
        out = program.module()(**inputs)
        other = {**_padded_batch("llama", seed=15), "use_cache": False}  # the graph is not specialised to its example
        other_out = program.module()(**other)
    depth = model_depth(model)
    assert_fp32_close(out.logits, expected.logits, depth, "exported logits")
    assert_fp32_close(out.aux_loss, expected.aux_loss, depth, "exported aux_loss")
    assert_fp32_close(other_out.logits, _forward(model, other).logits, depth, "exported logits, other inputs")


# ------------------------------------------------------------------------------------------- parallel plans


def _generic(name):
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


@pytest.mark.parametrize("family, backbone, head", _cases([("llama", "ForCausalLM"), ("llama", "Model"), ALL_CASES[1]]))
def test_parallel_plans_match_parameters(family, backbone, head):
    model = _model(family, backbone, head)
    params = {_generic(name) for name, _ in model.named_parameters()}
    for plan_name in ("tp_plan", "ep_plan"):
        plan = getattr(model, plan_name) or {}
        # a rule names a parameter or a module holding parameters
        stale = [key for key in plan if not any(p == key or p.startswith(key + ".") for p in params)]
        assert not stale, f"{plan_name} rules that match no parameter: {stale}"
    if backbone == "llama":  # the dense backbone shards its attention; the wrapper must keep those rules
        attention = {p.rsplit(".", 1)[0] for p in params if ".self_attn." in p}
        assert attention <= set(model.tp_plan), (
            f"attention projections without a tp rule: {attention - set(model.tp_plan)}"
        )


# ------------------------------------------------------------------------------------------- base model


def _head_only_numel(backbone, head):
    """Parameters the dense transformers head adds on top of its base model (lm_head, classifier...)."""
    dense = AUTO_CLASS[head].from_config(AutoConfig.for_model(**text_config(backbone), num_labels=3))
    return sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in dense.base_model.parameters())


@pytest.mark.parametrize("family, backbone, head", _cases(ALL_CASES))
def test_base_model_is_the_headless_pretrained_model(family, backbone, head, tmp_path, assert_fp32_close):
    model = _model(family, backbone, head)
    base = model.base_model
    assert isinstance(base, PreTrainedModel), f"base_model is a {type(base).__name__}"
    if head == "Model":
        assert base is model
    else:
        # `base_model_prefix` names the attribute holding the base model: its keys are the head's keys minus the prefix
        assert getattr(model, model.base_model_prefix) is base
        head_state = model.state_dict(keep_vars=True)
        for name, tensor in base.state_dict(keep_vars=True).items():
            assert head_state[f"{model.base_model_prefix}.{name}"] is tensor, name
        # the base model holds every parameter except those the dense head adds (HyperMoE's generators included)
        in_base = {id(p) for p in base.parameters()}
        outside_numel = sum(p.numel() for p in model.parameters() if id(p) not in in_base)
        head_numel = _head_only_numel(backbone, head)
        assert outside_numel == head_numel, f"{outside_numel} parameters outside base_model, the head has {head_numel}"

    inputs = _padded_batch(backbone, seed=16)
    base_out = _forward(base, inputs)
    base.save_pretrained(tmp_path)
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is hf_moe.MODEL_CLASSES[family, "Model"]
    assert not [k for k in info["missing_keys"] if "pooler" not in k], info  # BertForMaskedLM has no pooler
    assert not info["unexpected_keys"], info
    out = _forward(loaded.eval(), inputs)
    depth, mask = model_depth(model), inputs["attention_mask"]
    got, want = out.last_hidden_state, base_out.last_hidden_state
    assert_fp32_close(_real(got, mask), _real(want, mask), depth, "reloaded base model output")
    assert_fp32_close(out.aux_loss, base_out.aux_loss, depth, "reloaded base model aux_loss")


@pytest.mark.parametrize(
    "family, backbone, head", _cases([("llama", "ForCausalLM"), ("bert", "ForSequenceClassification")])
)
def test_a_head_loads_every_base_weight_from_a_base_checkpoint(family, backbone, head, tmp_path):
    base = _model(family, backbone, "Model")
    base.save_pretrained(tmp_path)
    loaded, info = AUTO_CLASS[head].from_pretrained(tmp_path, output_loading_info=True)
    assert all(re.search(r"(^|\.)(lm_head|classifier)\.", key) for key in info["missing_keys"]), info
    loaded_state = loaded.state_dict()
    for name, tensor in base.state_dict().items():
        # transformers adds the prefix to a base checkpoint's keys (or finds them already prefixed)
        key = name if name in loaded_state else f"{loaded.base_model_prefix}.{name}"
        assert torch.equal(loaded_state[key], tensor), f"{name} was not loaded into {head}"


def _legacy_layout(model) -> dict:
    """The model's state dict under hf-moe 0.1's key layout, written out here: a head kept the whole dense model
    under `model.` and the stack modules (HyperMoE's generators) at the top; `<Family>Model` kept the dense base model
    under `model.<its prefix>.`."""
    prefix, state = model.base_model_prefix, model.state_dict()
    if model.base_model is model:
        return {key if key.startswith("hyper_generators.") else f"model.{prefix}.{key}": t for key, t in state.items()}
    generators = f"{prefix}.hyper_generators."
    return {key[len(prefix) + 1 :] if key.startswith(generators) else f"model.{key}": t for key, t in state.items()}


LEGACY_CASES = [("llama", "ForCausalLM", "ForCausalLM"), ("bert", "ForSequenceClassification",
                 "ForSequenceClassification"), ("llama", "Model", "Model"), ("bert", "Model", "ForMaskedLM")]


@pytest.mark.parametrize(
    "family, backbone, saved, loaded",
    [pytest.param(f, b, s, lo, id=f"{f}-{b}-{s}-{lo}") for f in FAMILIES for b, s, lo in LEGACY_CASES],
)
def test_checkpoints_of_the_old_key_layout_load_and_save_in_the_new_one(family, backbone, saved, loaded, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(family, backbone, saved)
    model.config.save_pretrained(tmp_path / "old")
    legacy = {key: tensor.contiguous() for key, tensor in _legacy_layout(model).items()}
    save_file(legacy, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    same = {key for key in set(legacy) & set(model.state_dict()) if not key.startswith("hyper_generators.")}
    assert not same  # the layouts differ everywhere but in a base model's generators

    reloaded, info = AUTO_CLASS[loaded].from_pretrained(tmp_path / "old", output_loading_info=True)
    # a base checkpoint leaves only the head new (and BertForMaskedLM has no pooler)
    assert not [key for key in info["unexpected_keys"] if ".pooler." not in key] and not info["mismatched_keys"], info
    assert all(re.search(r"(^|\.)(lm_head|classifier|cls|pooler)\.", key) for key in info["missing_keys"]), info
    reloaded_state = reloaded.state_dict()
    for name, tensor in model.state_dict().items():
        key = name if name in reloaded_state else f"{reloaded.base_model_prefix}.{name}"
        if key in reloaded_state:
            assert torch.equal(reloaded_state[key], tensor), name
    assert sum(name in reloaded_state or f"{reloaded.base_model_prefix}.{name}" in reloaded_state
               for name in model.state_dict()) >= len(model.state_dict()) - 2  # the pooler only
    reloaded.save_pretrained(tmp_path / "new")
    assert set(load_file(tmp_path / "new" / "model.safetensors")) <= set(reloaded_state)  # saved in the new layout


# ------------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize(
    "family, backbone, head", _cases([("llama", "ForCausalLM"), ("bert", "ForSequenceClassification")])
)
def test_concurrent_forwards_on_one_model_equal_sequential_ones(family, backbone, head, assert_fp32_close):
    model = _model(family, backbone, head)
    batches = [_padded_batch(backbone, seed=17), _padded_batch(backbone, seed=18, batch=3, seq=5)]
    sequential = [_forward(model, inputs) for inputs in batches]
    depth = model_depth(model)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(4):
            results = list(pool.map(lambda inputs: _forward(model, inputs), batches * 2))
            for i, out in enumerate(results):
                want = sequential[i % 2]
                assert_fp32_close(out.logits, want.logits, depth, f"thread {i} logits")
                assert_fp32_close(out.aux_loss, want.aux_loss, depth, f"thread {i} aux_loss")
