"""The options that reproduce the official codes where hf-moe departs from them, for the mechanisms every family
shares (issue #11): router precision, balance- and z-loss pooling, jitter scope, capacity rules and the output of
a dropped token (docs/topk.md §6, docs/hypermoe.md §6, docs/hyperrouter.md §6, docs/dynamic.md §6, docs/mh_moe.md
§6). Each option is compared with a port of the official formula written here, per token or per sequence, in
float64 (and, where transformers ships the official code, with that code too); no port calls hf_moe."""

import math

import pytest
import torch
import torch.nn.functional as F
from layer_helpers import FAMILIES, HIDDEN, make_config, make_inputs, make_layer
from models_common import dropout_free, make_model, random_ids, task_loss
from references import _router_rows, descending, expert_ffn, hyper_expert, linear, logsumexp, params_of, softmax
from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralTopKRouter, load_balancing_loss_func

pytestmark = pytest.mark.usefixtures("single_thread")

BF16 = torch.bfloat16


def rounded(values, dtype) -> torch.Tensor:
    """float64 `values` rounded once to `dtype` (what a kernel accumulating in float32 or wider returns)."""
    return torch.as_tensor(values, dtype=torch.float64).to(dtype).double()


# ------------------------------------------------------------------------------------ 1. fields and their checks


@pytest.mark.parametrize(
    "field, value",
    [
        ("router_dtype", "bfloat16"),
        ("router_jitter_scope", "experts"),
        ("router_loss_pooling", "sum"),
        ("expert_capacity_rule", "tutel"),
        ("dropped_token_output", "input"),
    ],
)
def test_unknown_option_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field}='{value}' must be one of"):
        make_config("topk", **{field: value})


def test_capacity_fields_are_checked_together():
    with pytest.raises(ValueError, match=r'expert_capacity=None must be >= 1 with expert_capacity_rule="switch"'):
        make_config("topk", expert_capacity_rule="switch")
    with pytest.raises(ValueError, match=r"expert_capacity=0 must be >= 1"):
        make_config("topk", expert_capacity_rule="switch", expert_capacity=0)
    with pytest.raises(ValueError, match=r'expert_capacity=4 applies to expert_capacity_rule="switch" only'):
        make_config("topk", expert_capacity=4)
    with pytest.raises(ValueError, match=r'expert_capacity_factor=1.0 applies to expert_capacity_rule="hf_moe" only'):
        make_config("topk", expert_capacity_rule="gshard", expert_capacity_factor=1.0)
    with pytest.raises(ValueError, match=r"router_loss_pooling='switch' cannot be \"switch\" for top-p"):
        make_config("dynamic", router_loss_pooling="switch")


def test_options_survive_a_config_round_trip():
    options = {
        "router_dtype": "model",
        "router_jitter_scope": "input_always",
        "router_loss_pooling": "switch",
        "expert_capacity_rule": "switch",
        "expert_capacity": 64,
        "dropped_token_output": "scaled_input",
    }
    config = make_config("hypermoe", **options)
    again = type(config).from_dict(config.to_dict())
    assert {name: getattr(again, name) for name in options} == options


# ------------------------------------------------------------------------------------ 2. router precision


def test_router_dtype_model_is_mixtral_router():
    """docs/topk.md §6, item 3: logits in the model dtype (each rounded once), softmax and top-k in float32; equal
    to transformers' own MixtralTopKRouter on the same weight."""
    layer, _, _ = make_layer("topk", num_experts=8, top_k=2, dtype=BF16, router_dtype="model")
    x, _ = make_inputs(dtype=BF16, padded=False, batch=4, seq=16)
    tokens = x.reshape(-1, HIDDEN)
    mixtral = MixtralTopKRouter(MixtralConfig(hidden_size=HIDDEN, num_local_experts=8, num_experts_per_tok=2))
    mixtral.to(BF16)
    with torch.no_grad():
        mixtral.weight.copy_(layer.router.weight)
        out = layer(x)
        mixtral_logits, _, mixtral_index = mixtral(tokens)
    assert torch.equal(out.router_logits, mixtral_logits.float())
    assert torch.equal(out.expert_index, mixtral_index)

    weight = layer.router.weight.double()
    checked = 0
    for t, v in enumerate(tokens.double()):
        terms = weight * v  # [E, H], exact
        exact = terms.sum(-1)
        logits = out.router_logits[t].double()
        assert torch.equal(logits, rounded(logits, BF16)), "logits are not model-dtype values"
        assert ((logits - exact).abs() <= 2**-8 * exact.abs() + 1e-5 * terms.abs().sum(-1)).all()
        order = descending(softmax(logits))  # float64 softmax of the model-dtype logits
        if logits[order[1]] != logits[order[2]]:  # no tie at the top-k boundary
            assert sorted(out.expert_index[t].tolist()) == sorted(order[:2])
            checked += 1
    assert checked >= 48

    layer.config.router_dtype = "float32"  # the default: logits in float32
    with torch.no_grad():
        default = layer(x).router_logits
    assert not torch.equal(default, default.to(BF16).float())
    torch.testing.assert_close(default.double(), tokens.double() @ weight.t(), rtol=1e-5, atol=1e-6)


def official_top_p(probs: torch.Tensor, top_p: float, dtype) -> list[int]:
    """ZhenweiAn/Dynamic_MoE `top_p_sampling_batched_all_sequence` on one token, with its probabilities, cumsum and
    threshold in `dtype`: the experts by decreasing probability up to the first whose cumulative probability
    exceeds p (all if none does)."""
    probs = rounded(probs, dtype).tolist()
    order = sorted(range(len(probs)), key=lambda e: -probs[e])
    threshold = rounded(top_p, dtype).item()
    total = 0.0
    for i, e in enumerate(order):
        total += probs[e]
        if rounded(total, dtype).item() > threshold:
            return order[: i + 1]
    return order


def test_router_dtype_model_reproduces_official_top_p():
    """docs/dynamic.md §6, item 1: with `router_dtype="model"` the probabilities are sorted and summed in the model
    dtype. Token 0 is made to sit at the threshold: its first probability 0.40051 exceeds p = 0.4 in float32, but
    not in bf16 (both round to 0.400390625), so the two precisions select one and two experts."""
    num_experts = 4
    layer, _, _ = make_layer("dynamic", num_experts=num_experts, dtype=BF16, router_top_p=0.4)
    x, _ = make_inputs(dtype=BF16, padded=False, batch=2, seq=8)
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([0.6953125, 0.0, 0.0, 0.0])  # exact in bf16
        x[0, 0] = 0.0
        x[0, 0, 0] = 1.0  # logits of token 0: [0.6953125, 0, 0, 0]

    counts = {}
    for setting, dtype in (("model", BF16), ("float32", torch.float32)):
        layer.config.router_dtype = setting
        with torch.no_grad():
            out = layer(x)
        logits = out.router_logits.double()
        assert torch.equal(logits, rounded(logits, BF16)) == (setting == "model")
        counts[setting] = []
        for t, z in enumerate(logits):
            chosen = official_top_p(softmax(z), 0.4, dtype)
            got = [e for e in out.expert_index[t].tolist() if e < num_experts]
            assert len(got) == len(chosen), (setting, t)
            probs = rounded(softmax(z), dtype)
            unchosen = [e for e in range(num_experts) if e not in chosen]
            if not unchosen or probs[chosen[-1]] != probs[unchosen].max():  # no tie at the boundary
                assert set(got) == set(chosen), (setting, t)
            counts[setting].append(len(got))
    assert counts["float32"][0] == 1 and counts["model"][0] == 2


def test_router_dtype_model_generates_hyperrouter_logits_in_the_model_dtype():
    """docs/hyperrouter.md §6, item 4: the official gate generates W_r, b_r and the logits in the model dtype (fp16
    under --fp16); each step here is the float64 value rounded once to bf16."""
    num_experts = 8
    layer, _, _ = make_layer("hyperrouter", num_experts=num_experts, top_k=2, dtype=BF16, router_dtype="model")
    x, _ = make_inputs(dtype=BF16, padded=False, batch=4, seq=16)
    with torch.no_grad():
        out = layer(x)
    hypernet = {name: t.double() for name, t in layer.router.hypernet.state_dict().items()}
    embedding = layer.router.router_embedding.double()
    hidden = torch.relu(rounded(linear(hypernet["0.weight"], hypernet["0.bias"], embedding), BF16))
    theta = rounded(linear(hypernet["2.weight"], hypernet["2.bias"], hidden), BF16).view(num_experts, -1)
    weight, bias = theta[:, :-1], theta[:, -1]

    checked = 0
    for t, v in enumerate(x.reshape(-1, HIDDEN).double()):
        logits = out.router_logits[t].double()
        assert torch.equal(logits, rounded(logits, BF16)), "logits are not model-dtype values"
        expected = rounded(linear(weight, bias, v), BF16)
        # theta may round the other way where float32 accumulation lands on a bf16 boundary: one ulp per term
        bound = 2**-7 * ((weight * v).abs().sum(-1) + bias.abs() + expected.abs())
        assert ((logits - expected).abs() <= bound).all(), t
        order = descending(expected)
        if expected[order[1]] - expected[order[2]] > bound.max():  # a clear top-k boundary
            assert sorted(out.expert_index[t].tolist()) == sorted(order[:2])
            checked += 1
    assert checked >= 16

    layer.config.router_dtype = "float32"
    with torch.no_grad():
        default = layer(x).router_logits
    assert not torch.equal(default, default.to(BF16).float())


# ------------------------------------------------------------------------------------ 3. a port of the layer


def switch_keep(selections, seq_len: int, top_k: int, num_experts: int, capacity: int) -> list[list[bool]]:
    """Switch's top-1 router (transformers 4.x, HyperMoE's vendored copy): per sequence, an expert's slots are
    numbered by the cumulative sum of its one-hot over the sequence's tokens, padding included, and kept up to
    `capacity`; for k > 1 the first choices of the sequence are numbered before its second choices."""
    keep = [[False] * top_k for _ in selections]
    for start in range(0, len(selections), seq_len):
        used = [0] * num_experts
        for rank in range(top_k):
            for t in range(start, start + seq_len):
                expert = selections[t][rank]
                used[expert] += 1
                keep[t][rank] = used[expert] <= capacity
    return keep


def gshard_keep(selections, real, top_k: int, num_experts: int) -> list[list[bool]]:
    """MH-MoE's official `TopkGate` (tutel_routing.py): capacity k·ceil(S'/E) over the S' routed rows; locations
    from the cumulative sum of the first choices, then the second choices offset by the first choices' counts."""
    rows = [t for t in range(len(selections)) if real[t]]
    capacity = top_k * math.ceil(len(rows) / num_experts)
    keep = [[False] * top_k for _ in selections]
    used = [0] * num_experts
    for rank in range(top_k):
        for t in rows:
            expert = selections[t][rank]
            used[expert] += 1
            keep[t][rank] = used[expert] <= capacity
    return keep


def port_layer(layer, family, x, act_name, generator, keep_rule, scaled_input: bool):
    """The official layer output, one routed row at a time: the kept slots' experts with their weights, a dropped
    slot adding 0 or (scaled_input) its weight times the row, plus HyperMoE's HyperExpert of the selection before
    drops; MH-MoE rows are the sub-tokens of the head projection. Returns the output [B, S, d] and, per routed row,
    the experts after drops (num_experts where dropped)."""
    config = layer.config
    batch, seq, d = x.shape
    heads = config.moe_num_heads if family == "mh" else 1
    mp = params_of(layer)
    rows = []
    for v in x.reshape(-1, d):
        if heads > 1:
            v = linear(mp["head_proj.weight"], mp["head_proj.bias"], v)
        rows += list(v.reshape(heads, d // heads))
    routed = _router_rows(layer, family, rows, config)
    keep = keep_rule([chosen for _, _, chosen, _ in routed])
    outputs, after_drops = [], []
    for v, (_, _, chosen, w), kept in zip(rows, routed, keep):
        y = torch.zeros_like(v)
        for j, e in enumerate(chosen):
            if kept[j]:
                y = y + w[j] * expert_ffn(layer.experts, e, v, act_name)
            elif scaled_input:
                y = y + w[j] * v
        if family == "hypermoe":
            y = y + hyper_expert(layer, generator, chosen, v)
        outputs.append(y)
        after_drops.append([e if k else config.num_experts for e, k in zip(chosen, kept)])
    tokens = torch.stack(outputs).reshape(-1, d)
    if heads > 1:
        tokens = torch.stack([linear(mp["merge_proj.weight"], mp["merge_proj.bias"], v) for v in tokens])
    return tokens.reshape(batch, seq, d), torch.tensor(after_drops)


# ------------------------------------------------------------------------------------ 4. capacity and dropped tokens


@pytest.mark.parametrize(
    "family, top_k, capacity, dropped",
    [
        pytest.param("topk", 1, 1, "zero", id="switch-5.x"),
        pytest.param("topk", 1, 1, "scaled_input", id="switch-4.x"),
        pytest.param("topk", 2, 2, "scaled_input", id="topk-k2"),
        pytest.param("hypermoe", 1, 1, "scaled_input", id="hypermoe-official"),
        pytest.param("hypermoe", 2, 2, "zero", id="hypermoe-k2"),
    ],
)
def test_switch_capacity_per_sequence_matches_the_official_router(family, top_k, capacity, dropped):
    """docs/topk.md §6, item 5 and docs/hypermoe.md §6, item 3: at most `expert_capacity` tokens per expert and
    sequence, in token order, padding included; a dropped token outputs 0 or p_max·x (plus the HyperExpert)."""
    layer, generator, act_name = make_layer(
        family, top_k=top_k, expert_capacity_rule="switch", expert_capacity=capacity, dropped_token_output=dropped
    )
    x, mask = make_inputs(padded=True)
    out = layer(x, mask)
    seq = x.shape[1]

    def rule(selections):
        return switch_keep(selections, seq, top_k, 4, capacity)

    expected, after_drops = port_layer(layer, family, x, act_name, generator, rule, dropped == "scaled_input")
    assert (after_drops == 4).any(), "the case drops nothing"
    assert torch.equal(out.expert_index, after_drops)
    torch.testing.assert_close(out.hidden_states, expected, rtol=1e-9, atol=1e-12)  # every token: padding is routed


@pytest.mark.parametrize("family", ["mh2", "topk"])
@pytest.mark.parametrize("padded", [False, True])
def test_gshard_capacity_matches_the_official_mh_moe_gate(family, padded):
    """docs/mh_moe.md §6, item 3: capacity k·ceil(S'/E) over the S' routed rows (sub-tokens) of the batch, first
    choices before second choices, overflow giving 0. Official: every row is routed (no mask); with a padding mask
    hf-moe routes the real rows only."""
    layer, generator, act_name = make_layer(family, num_experts=8, top_k=2, expert_capacity_rule="gshard")
    x, mask = make_inputs(padded=padded)
    out = layer(x, mask)
    heads = layer.config.moe_num_heads if FAMILIES[family][0] == "mh" else 1
    real = [True] * (x.shape[0] * x.shape[1] * heads)
    if padded:
        real = mask.reshape(-1).repeat_interleave(heads).bool().tolist()

    def rule(selections):
        return gshard_keep(selections, real, 2, 8)

    expected, after_drops = port_layer(layer, FAMILIES[family][0], x, act_name, generator, rule, False)
    routed = torch.tensor(real)
    assert (after_drops[routed] == 8).any(), "the case drops nothing"
    assert torch.equal(out.expert_index[routed], after_drops[routed])
    rows = torch.ones_like(x[..., 0], dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(out.hidden_states[rows], expected[rows], rtol=1e-9, atol=1e-12)


def test_switch_capacity_needs_sequences():
    layer, _, _ = make_layer("mh2", expert_capacity_rule="switch", expert_capacity=2)
    x, mask = make_inputs()
    with pytest.raises(ValueError, match=r'expert_capacity_rule="switch" counts per sequence'):
        layer(x, mask)


# ------------------------------------------------------------------------------------ 5. jitter scope


def jittered_input(x, eps: float, seed: int) -> torch.Tensor:
    """x times the U(1 - eps, 1 + eps) noise the layer draws after `torch.manual_seed(seed)` (one [T, H] draw)."""
    torch.manual_seed(seed)
    noise = torch.empty(x.shape[0] * x.shape[1], x.shape[2], dtype=x.dtype).uniform_(1.0 - eps, 1.0 + eps)
    return x * noise.view_as(x)


def dropless(selections):
    return [[True] * len(chosen) for chosen in selections]


@pytest.mark.parametrize("family", ["topk", "hypermoe"])
def test_jitter_scope_input_jitters_what_the_experts_see(family):
    """docs/topk.md §6, item 4: Mixtral and Switch multiply the layer input itself, so the experts (and HyperMoE's
    HyperExpert) see the noise; in training only."""
    eps = 0.3
    layer, generator, act_name = make_layer(family, router_jitter_noise=eps, router_jitter_scope="input")
    x, mask = make_inputs(padded=True)
    real = mask.bool()
    layer.train()
    torch.manual_seed(7)
    out = layer(x, mask)
    expected, _ = port_layer(layer, family, jittered_input(x, eps, 7), act_name, generator, dropless, False)
    torch.testing.assert_close(out.hidden_states[real], expected[real], rtol=1e-9, atol=1e-12)
    layer.eval()
    expected, _ = port_layer(layer, family, x, act_name, generator, dropless, False)
    torch.testing.assert_close(layer(x, mask).hidden_states[real], expected[real], rtol=1e-9, atol=1e-12)


def test_jitter_scope_input_always_jitters_at_eval_too():
    """docs/hypermoe.md §6, item 6: HyperMoE's vendored Switch router jitters the layer input in place, in training
    and at eval, so the experts and the HyperExpert see the jittered x."""
    eps = 0.3
    layer, generator, act_name = make_layer("hypermoe", router_jitter_noise=eps, router_jitter_scope="input_always")
    x, mask = make_inputs(padded=True)
    real = mask.bool()
    layer.eval()
    torch.manual_seed(11)
    out = layer(x, mask)
    expected, _ = port_layer(layer, "hypermoe", jittered_input(x, eps, 11), act_name, generator, dropless, False)
    torch.testing.assert_close(out.hidden_states[real], expected[real], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------ 6. loss pooling


def masked_lse_squared(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = [logsumexp(z) ** 2 for z, real in zip(logits.double(), mask.reshape(-1).tolist()) if real]
    return sum(values) / len(values)


def test_router_loss_pooling_mixtral_is_load_balancing_loss_func(assert_fp32_close):
    """docs/topk.md §6, item 1: transformers' `load_balancing_loss_func` pools the expert fractions and mean
    probabilities of every layer's non-padding tokens; the loss adds coef · that (and the z-loss per layer)."""
    num_experts, top_k = 4, 2
    model = make_model(
        "TopKMoe", "llama", "ForCausalLM", router_loss_pooling="mixtral", router_z_loss_coef=0.01,
        text_overrides=dropout_free("llama"),
    )
    ids = random_ids((2, 8), seed=1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = model(**inputs, output_router_logits=True)

    real = mask.reshape(-1).bool().tolist()
    fraction, mean_prob, count = torch.zeros(num_experts, dtype=torch.float64), 0, 0
    for layer_logits in out.router_logits:
        for z, is_real in zip(layer_logits.double(), real):
            if is_real:
                probs = softmax(z)
                for e in descending(probs)[:top_k]:
                    fraction[e] += 1
                mean_prob, count = mean_prob + probs, count + 1
    expected = num_experts * (fraction / count * mean_prob / count).sum()
    assert_fp32_close(out.aux_loss, expected, what="pooled balance loss")
    official = load_balancing_loss_func(out.router_logits, num_experts, top_k, mask)
    assert_fp32_close(official, expected, what="transformers' load_balancing_loss_func")

    z_loss = sum(masked_lse_squared(layer_logits, mask) for layer_logits in out.router_logits)
    loss = task_loss("ForCausalLM", out, inputs) + 0.1 * expected + 0.01 * z_loss
    assert_fp32_close(out.loss, loss, what="loss")


def official_switch_losses(stack_logits, batch: int, capacity: int):
    """Switch Transformers (HyperMoE's vendored copy) on one stack: top-1 per layer with the per-sequence capacity
    (a dropped token's index is the argmax of its empty row, expert 0), the layers' logits and indices concatenated
    along the sequence axis (`_unpack_router_logits`), `load_balancing_loss_func` (f and mean P per sequence, padding
    included, E² · mean over sequences and experts) and `router_z_loss_func` (mean over every token)."""
    num_experts = stack_logits[0].shape[-1]
    counts = [[] for _ in range(batch)]  # per sequence: one-hot after drops of every position of every layer
    probs = [[] for _ in range(batch)]
    squares = []
    for layer_logits in stack_logits:
        z = layer_logits.double().reshape(batch, -1, num_experts)
        for b in range(batch):
            used = [0] * num_experts
            for token_logits in z[b]:
                p = softmax(token_logits)
                expert = descending(p)[0]
                used[expert] += 1
                counts[b].append(F.one_hot(torch.tensor(expert if used[expert] <= capacity else 0), num_experts))
                probs[b].append(p)
                squares.append(logsumexp(token_logits) ** 2)
    per_sequence = [
        (torch.stack(c).double().mean(0) * torch.stack(p).mean(0)).sum() for c, p in zip(counts, probs)
    ]
    aux_loss = num_experts**2 * sum(per_sequence) / (batch * num_experts)
    return aux_loss, sum(squares) / len(squares)


@pytest.mark.parametrize("family", ["TopKMoe", "HyperMoe"])
def test_router_loss_pooling_switch_pools_each_stack_per_sequence(family, assert_fp32_close):
    """docs/topk.md §6, items 1-2 and docs/hypermoe.md §6, items 1-2 with the official Switch setup (top-1, weight
    p_max, per-sequence capacity): balance and z-loss per stack, encoder and decoder added."""
    model = make_model(
        family, "t5", "ForConditionalGeneration", num_experts_per_tok=1, expert_capacity_rule="switch",
        expert_capacity=2, dropped_token_output="scaled_input", router_loss_pooling="switch",
        router_z_loss_coef=0.01, text_overrides=dropout_free("t5"),
    )
    ids = random_ids((2, 8), seed=1)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding, as T5's tokenizer pads
    labels = random_ids((2, 5), seed=3)
    labels[1, -1] = -100
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = model(**inputs, output_router_logits=True)
    assert len(out.router_logits) == 4  # call order: the encoder's two MoE layers, then the decoder's

    encoder_aux, encoder_z = official_switch_losses(out.router_logits[:2], 2, 2)
    decoder_aux, decoder_z = official_switch_losses(out.router_logits[2:], 2, 2)
    assert_fp32_close(out.aux_loss, encoder_aux + decoder_aux, what="balance loss")
    loss = task_loss("ForConditionalGeneration", out, inputs)
    loss = loss + 0.1 * (encoder_aux + decoder_aux) + 0.01 * (encoder_z + decoder_z)
    assert_fp32_close(out.loss, loss, what="loss")

    # given encoder outputs (as generate() does), the forward runs and pools the decoder's layers only
    encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=mask)
    out = model(encoder_outputs=encoder_outputs, attention_mask=mask, labels=labels, output_router_logits=True)
    assert len(out.router_logits) == 2
    decoder_aux, _ = official_switch_losses(out.router_logits, 2, 2)
    assert_fp32_close(out.aux_loss, decoder_aux, what="decoder-only balance loss")
