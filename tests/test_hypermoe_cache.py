"""HyperMoE's batched HyperExpert and its inference cache of generated adapters (issue #13): outputs and gradients
against a float64 reference written here one token at a time, greedy generation with the cache as with a cache
cleared before every layer call, and every way a parameter can change invalidating the cache."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from layer_helpers import make_layer
from models_common import make_model, random_ids

from hf_moe.modeling.hypermoe import HyperExpertGenerator, HyperMoeLayer
from hf_moe.training.peft import apply_lora

pytestmark = pytest.mark.usefixtures("single_thread")

# float32 rounding of the HyperExpert: embedding sum, two embedding_process linears, trunk, head, two adapter matmuls
DEPTH = 7
HEADS = ("weight_down", "bias_down", "weight_up", "bias_up")


# --------------------------------------------------------------------------------------------- reference


def hyper_parameters(layer, generator) -> dict:
    """Every parameter the HyperExpert reads, by name."""
    named = {f"layer.{n}": p for n, p in layer.named_parameters() if n.startswith(("expert_embedding", "embedding_"))}
    return named | {f"generator.{n}": p for n, p in generator.named_parameters()}


def as_float64(params: dict) -> dict:
    return {n: p.detach().double().requires_grad_() for n, p in params.items()}


def reference_hyper_expert(params: dict, layer_idx: int, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[T, d] in float64, each token's adapter generated for it alone: the sum of its unselected experts' embeddings
    (index E selects nothing) -> embedding_process -> generator -> relu(v·W_down + b_down)·W_up + b_up."""
    p = params
    embedding = p["layer.expert_embedding.weight"]  # [E, emb]
    rank = p["generator.bias_down.bias"].shape[0]
    outputs = []
    for v, chosen in zip(x.double(), index.tolist()):
        s = sum((embedding[e] for e in range(embedding.shape[0]) if e not in chosen), torch.zeros_like(embedding[0]))
        u = F.linear(s, p["layer.embedding_process.0.weight"], p["layer.embedding_process.0.bias"]).relu()
        u = F.linear(u, p["layer.embedding_process.2.weight"], p["layer.embedding_process.2.bias"])
        trunk_input = torch.cat([u, p["generator.layer_embedding.weight"][layer_idx]])
        g = F.linear(trunk_input, p["generator.trunk.weight"], p["generator.trunk.bias"]).relu()
        head = {name: F.linear(g, p[f"generator.{name}.weight"], p[f"generator.{name}.bias"]) for name in HEADS}
        hidden = (v @ head["weight_down"].view(-1, rank) + head["bias_down"]).relu()  # [r]
        outputs.append(hidden @ head["weight_up"].view(rank, -1) + head["bias_up"])  # [d]
    return torch.stack(outputs)


def distinct_sets(num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """[5, k]: four distinct selections (each in random order), then the first with a sentinel slot (index E, one
    expert fewer selected)."""
    generator = torch.Generator().manual_seed(seed)
    sets = []
    while len(sets) < 4:
        candidate = torch.randperm(num_experts, generator=generator)[:top_k]
        if all(set(candidate.tolist()) != set(s.tolist()) for s in sets):
            sets.append(candidate)
    with_sentinel = sets[0].clone()
    with_sentinel[0] = num_experts
    return torch.stack([*sets, with_sentinel])


def tokens_of(sets: torch.Tensor, num_tokens: int, seed: int) -> torch.Tensor:
    """[num_tokens, k]: tokens drawn from `sets`, each set at least once."""
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randint(len(sets), (num_tokens - len(sets),), generator=generator)
    picks = torch.cat([torch.arange(len(sets)), extra])
    return sets[picks[torch.randperm(num_tokens, generator=generator)]]


def count_generated_rows(generator) -> list[int]:
    """A list that receives the number of rows of every generator call."""
    rows = []
    generator.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    return rows


# --------------------------------------------------------------------------------------------- (a), (d): one layer

# (8, 2) and (4, 1) number their sets and cache them; (128, 9) overflows int64 (129^9 > 2^63) and runs uncached
CASES = [pytest.param(8, 2, id="E8-k2"), pytest.param(4, 1, id="E4-k1"), pytest.param(128, 9, id="E128-k9-uncached")]


def run_three_batches(layer, generator, assert_fp32_close) -> list[int]:
    """Three batches at inference, each output against the float64 reference: the first meets two sets, the second
    four (one met before), the third two (both met before); returns the rows of every generator call."""
    layer.eval()
    params = as_float64(hyper_parameters(layer, generator))
    sets = distinct_sets(layer.num_experts, layer.config.num_experts_per_tok, seed=0)
    batches = [tokens_of(sets[:2], 24, seed=1), tokens_of(sets[1:], 30, seed=2), tokens_of(sets[[0, 3]], 2, seed=3)]
    rows = count_generated_rows(generator)
    torch.manual_seed(0)
    for index in batches:
        x = torch.randn(index.shape[0], layer.hidden_size)
        with torch.no_grad():
            got = layer.hyper_expert(x, index)
        assert_fp32_close(got, reference_hyper_expert(params, layer.layer_idx, x, index), DEPTH, "HyperExpert")
    return rows


@pytest.mark.parametrize("num_experts, top_k", CASES)
def test_cached_inference_matches_float64_per_token_reference(num_experts, top_k, assert_fp32_close):
    """(a) A set's adapter is generated once, when a batch first meets it."""
    layer, generator, _ = make_layer("hypermoe", num_experts=num_experts, top_k=top_k, dtype=torch.float32)
    rows = run_three_batches(layer, generator, assert_fp32_close)
    if num_experts == 128:
        assert layer.adapter_cache is None and rows == [2, 4, 2]
    else:
        assert rows == [2, 3] and layer.adapter_cache.keys.shape == (5,)


def test_cache_restarts_from_the_batch_past_its_byte_budget(assert_fp32_close):
    """A batch whose new sets would take the cache past `adapter_cache_bytes` replaces it with its own sets."""
    layer, generator, _ = make_layer("hypermoe", num_experts=8, top_k=2, dtype=torch.float32)
    d, r = layer.hidden_size, generator.rank
    layer.adapter_cache_bytes = 3 * 4 * (2 * d * r + r + d)  # three sets of float32 adapters
    rows = run_three_batches(layer, generator, assert_fp32_close)
    assert rows == [2, 4, 2] and layer.adapter_cache.keys.shape == (2,)


@pytest.mark.parametrize("num_experts, top_k", CASES)
def test_batched_gradients_match_float64_per_token_reference(num_experts, top_k, assert_fp32_close):
    """(d) Training: the gradients of the input and of every parameter the HyperExpert reads."""
    layer, generator, _ = make_layer("hypermoe", num_experts=num_experts, top_k=top_k, dtype=torch.float32)
    params = hyper_parameters(layer, generator)
    params64 = as_float64(params)
    index = tokens_of(distinct_sets(num_experts, top_k, seed=0), 40, seed=1)
    torch.manual_seed(0)
    x = torch.randn(index.shape[0], layer.hidden_size, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    probe = torch.randn(index.shape[0], layer.hidden_size)
    got = torch.autograd.grad((layer.hyper_expert(x, index) * probe).sum(), [x, *params.values()])
    reference = reference_hyper_expert(params64, layer.layer_idx, x64, index)
    expected = torch.autograd.grad((reference * probe.double()).sum(), [x64, *params64.values()])
    for name, a, b in zip(["input", *params], got, expected):
        assert_fp32_close(a, b, DEPTH + 1, f"grad {name}")


# --------------------------------------------------------------------------------------------- models


def hyper_model(seed: int = 0, head: str = "ForCausalLM"):
    """A tiny HyperMoE llama whose HyperExpert is O(1) (the official tiny init makes it ~1e-3), so that a stale or
    misplaced adapter shows in the logits."""
    model = make_model("HyperMoe", "llama", head, seed=seed)
    with torch.no_grad():
        for generator in generators(model):
            for name in HEADS:
                for param in getattr(generator, name).parameters():
                    param.normal_(0.0, 0.1)
    return model.eval()


def hyper_layers(model) -> list[HyperMoeLayer]:
    return [m for m in model.modules() if isinstance(m, HyperMoeLayer)]


def generators(model) -> list[HyperExpertGenerator]:
    return [m for m in model.modules() if isinstance(m, HyperExpertGenerator)]


def clear_cache(layer, args):
    layer.train(False)


def greedy(model, prompt):
    return model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, num_beams=1,
        eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_scores=True,
    )


def test_greedy_generation_with_cache_equals_cache_cleared_at_every_call(assert_fp32_close):
    """(b) `generate` runs without grad: the cache serves every step, against the same model whose layers clear it
    (`train(False)`) before every call, so that each call generates the sets it meets."""
    model = hyper_model()
    prompt = random_ids((2, 5), seed=11)
    (generator,) = generators(model)
    rows = count_generated_rows(generator)
    cached = greedy(model, prompt)
    cached_rows = sum(rows)

    rows.clear()
    for layer in hyper_layers(model):
        layer.register_forward_pre_hook(clear_cache)
    cleared = greedy(model, prompt)
    assert torch.equal(cached.sequences, cleared.sequences), (cached.sequences, cleared.sequences)
    for step, (a, b) in enumerate(zip(cached.scores, cleared.scores)):
        assert_fp32_close(a, b, 2 * DEPTH, f"scores at step {step}")
    assert cached.sequences[:, 5:].unique().numel() > 1
    assert cached_rows < sum(rows) / 2, (cached_rows, sum(rows))  # the cache served most steps


# --------------------------------------------------------------------------------------------- (c) invalidation


def _first_layer(model) -> HyperMoeLayer:
    return hyper_layers(model)[0]


def _optimizer_step(model):
    parameters = [p for generator in generators(model) for p in generator.parameters()]
    for param in parameters:
        param.grad = torch.ones_like(param)
    torch.optim.AdamW(parameters, lr=0.05).step()


CHANGES = {
    "expert_embedding in place": lambda model: _first_layer(model).expert_embedding.weight.add_(1.0),
    "embedding_process in place": lambda model: _first_layer(model).embedding_process[2].bias.mul_(-3.0),
    "generator in place": lambda model: generators(model)[0].weight_up.weight.mul_(2.0),
    "optimizer step": _optimizer_step,
    "load_state_dict": lambda model: model.load_state_dict(hyper_model(seed=1).state_dict()),
    "to float64": lambda model: model.to(torch.float64),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_parameter_changes_invalidate_the_cache(change, assert_fp32_close):
    """(c) After the change the model gives what a fresh copy with the same weights gives (`deepcopy` leaves the
    cache behind), and the change shows in the logits."""
    model = hyper_model()
    ids = random_ids((2, 6), seed=5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert all(layer.adapter_cache is not None for layer in hyper_layers(model))
        CHANGES[change](model)
        after = model(input_ids=ids).logits
    fresh = copy.deepcopy(model)
    assert all(layer.adapter_cache is None for layer in hyper_layers(fresh))
    with torch.no_grad():
        expected = fresh(input_ids=ids).logits
    assert_fp32_close(after, expected, 2 * DEPTH, "logits after the change")
    if change != "to float64":
        assert (after - before).abs().max() > 1e-3 * before.abs().max()


def test_train_clears_the_cache(assert_fp32_close):
    """(c) An edit through `.data` bumps no version counter, so the cache cannot see it; `train()` (and so `eval()`)
    drops the cache, after which the edit shows."""
    model = hyper_model()
    ids = random_ids((2, 6), seed=5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        _first_layer(model).expert_embedding.weight.data.add_(1.0)
        assert torch.equal(model(input_ids=ids).logits, before)  # the stale cache
        model.train().eval()
        assert all(layer.adapter_cache is None for layer in hyper_layers(model))
        after = model(input_ids=ids).logits
        expected = copy.deepcopy(model)(input_ids=ids).logits
    assert_fp32_close(after, expected, 2 * DEPTH, "logits after train().eval()")
    assert (after - before).abs().max() > 1e-3 * before.abs().max()


def test_the_cache_stays_out_of_state_dict_and_pickles():
    layer, _, _ = make_layer("hypermoe", num_experts=8, top_k=2, dtype=torch.float32)
    keys = set(layer.eval().state_dict())
    with torch.no_grad():
        layer(torch.randn(2, 5, layer.hidden_size))
    assert layer.adapter_cache is not None and set(layer.state_dict()) == keys
    assert pickle.loads(pickle.dumps(layer)).adapter_cache is None


def test_peft_adapter_switch_invalidates_the_cache(assert_fp32_close):
    """PEFT's `modules_to_save` wrappers run the trained copies or, under `disable_adapter()`, the originals: same
    parameters, other adapters."""
    model = hyper_model(head="ForSequenceClassification")
    base = copy.deepcopy(model)
    peft_model = apply_lora(model, task_type="SEQ_CLS")
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".modules_to_save." in name and ("hyper_generators" in name or "expert_embedding" in name):
                param.add_(0.5)
    peft_model.eval()
    ids = random_ids((2, 6), seed=5)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            disabled = peft_model(input_ids=ids).logits
        expected = base(input_ids=ids).logits
    assert_fp32_close(disabled, expected, 2 * DEPTH, "logits with the adapters disabled")
    assert (adapted - expected).abs().max() > 1e-3 * expected.abs().max()
