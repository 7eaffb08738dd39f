"""Transformers' generation contract for every family's causal-LM head (tiny llama backbone): every `generate()` mode
transformers 5.24 ships (greedy, sampling, beam search, beam sampling, assisted decoding with an assistant model or
prompt lookup), cache on and off, the static cache with left padding, `logits_to_keep`, continuing from a returned
cache and generating from `inputs_embeds`. Contrastive search, DoLa and group/constrained beam search are Hub
`custom_generate` repositories in transformers 5.24, not part of the library (see test_conformance.py).

References: a full-sequence forward without cache (logits and beam scores recomputed from it), the same call
repeated, or the dynamic-cache run.
"""

import inspect

import pytest
import torch
from models_common import (
    FAMILIES,
    dropout_free,
    make_model,
    model_depth,
    random_ids,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NEW_TOKENS, PROMPT, PAD = 6, 6, 0


def _lm(family, seed=0):
    return make_model(family, "llama", "ForCausalLM", seed=seed, text_overrides=dropout_free("llama")).eval()


def _left_padded_prompts(seed=0):
    """Two prompts, the second left-padded by two tokens, as a tokenizer pads for generation."""
    ids = random_ids((2, PROMPT), seed)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[mask == 0] = PAD
    return {"input_ids": ids, "attention_mask": mask}


def _generate(model, inputs, **kwargs):
    kwargs = {"max_new_tokens": NEW_TOKENS, "eos_token_id": None, "pad_token_id": PAD, **kwargs}
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


def _full_forward_logits(model, sequences, prompt_mask):
    """Logits of a single uncached forward over the whole generated sequences (the prompt mask, then ones)."""
    mask = torch.cat([prompt_mask, torch.ones(len(sequences), sequences.shape[1] - prompt_mask.shape[1])], 1)
    with torch.no_grad():
        return model(input_ids=sequences, attention_mask=mask.long(), use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_and_without_cache_equals_a_full_forward(family, assert_fp32_close):
    model = _lm(family)
    inputs = _left_padded_prompts(seed=1)
    kwargs = {"do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    cached = _generate(model, inputs, use_cache=True, **kwargs)
    uncached = _generate(model, inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.sequences[:, PROMPT:].unique().numel() > 1  # not a constant continuation

    full = _full_forward_logits(model, cached.sequences, inputs["attention_mask"])
    depth = model_depth(model)
    for step, (with_cache, without_cache) in enumerate(zip(cached.logits, uncached.logits)):
        reference = full[:, PROMPT - 1 + step]
        assert_fp32_close(with_cache, reference, depth, f"cached logits, step {step}")
        assert_fp32_close(without_cache, reference, depth, f"uncached logits, step {step}")
        assert torch.equal(cached.sequences[:, PROMPT + step], reference.argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_with_a_seed_repeats_itself(family):
    model = _lm(family)
    inputs = _left_padded_prompts(seed=2)
    runs = {}
    for name, kwargs in {
        "sample": {"num_beams": 1},
        "sample again": {"num_beams": 1},
        "sample without cache": {"num_beams": 1, "use_cache": False},
        "beam sample": {"num_beams": 2},
        "beam sample again": {"num_beams": 2},
    }.items():
        torch.manual_seed(0)
        runs[name] = _generate(model, inputs, do_sample=True, top_k=0, **kwargs)
    assert runs["sample"].shape == (2, PROMPT + NEW_TOKENS)
    assert torch.equal(runs["sample"], runs["sample again"])
    assert torch.equal(runs["sample"], runs["sample without cache"])
    assert torch.equal(runs["beam sample"], runs["beam sample again"])


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_scores_equal_a_full_forward(family, assert_fp32_close):
    model = _lm(family)
    inputs = _left_padded_prompts(seed=3)
    kwargs = {
        "num_beams": 3,
        "num_return_sequences": 2,
        "length_penalty": 0.0,  # sequence score = summed log-probabilities of the generated tokens
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_scores": True,
    }
    cached = _generate(model, inputs, **kwargs)
    uncached = _generate(model, inputs, use_cache=False, **kwargs)
    assert cached.sequences.shape == (4, PROMPT + NEW_TOKENS)
    assert torch.equal(cached.sequences, uncached.sequences)

    prompt_mask = inputs["attention_mask"].repeat_interleave(2, dim=0)
    log_probs = _full_forward_logits(model, cached.sequences, prompt_mask)[:, PROMPT - 1 : -1].double().log_softmax(-1)
    summed = log_probs.gather(-1, cached.sequences[:, PROMPT:, None]).sum((1, 2))
    assert_fp32_close(cached.sequences_scores, summed, model_depth(model), "beam scores")
    assert (cached.sequences_scores[0::2] >= cached.sequences_scores[1::2]).all()  # best beam first


@pytest.mark.parametrize("family", FAMILIES)
def test_assisted_decoding_and_prompt_lookup_equal_greedy(family):
    model = _lm(family)
    assistant = _lm(family, seed=1)  # another model of the family: its drafts are often rejected
    prompt = random_ids((1, PROMPT), seed=4)
    inputs = {"input_ids": torch.cat([prompt, prompt], 1), "attention_mask": torch.ones(1, 2 * PROMPT).long()}
    greedy = _generate(model, inputs, do_sample=False)
    assert torch.equal(_generate(model, inputs, do_sample=False, assistant_model=assistant), greedy)
    assert torch.equal(_generate(model, inputs, do_sample=False, prompt_lookup_num_tokens=3), greedy)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_with_left_padding_equals_the_dynamic_cache(family):
    model = _lm(family)
    inputs = _left_padded_prompts(seed=5)
    dynamic = _generate(model, inputs, do_sample=False)
    static = _generate(model, inputs, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_to_keep_computes_only_the_kept_positions(family, assert_fp32_close):
    model = _lm(family)
    assert "logits_to_keep" in inspect.signature(model.forward).parameters, "generate() cannot ask for last logits"
    inputs = _left_padded_prompts(seed=6)
    with torch.no_grad():
        full = model(**inputs).logits
        last = model(**inputs, logits_to_keep=1).logits
    assert last.shape == (2, 1, full.shape[-1])
    assert_fp32_close(last, full[:, -1:], model_depth(model), "kept logits")

    head_inputs = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_inputs.append(args[0].shape))
    _generate(model, inputs, do_sample=False, max_new_tokens=3)
    hook.remove()
    assert [shape[1] for shape in head_inputs] == [1, 1, 1], f"lm_head inputs during generate: {head_inputs}"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_continues_from_a_returned_cache(family):
    model = _lm(family)
    inputs = _left_padded_prompts(seed=7)
    whole = _generate(model, inputs, do_sample=False)
    first = _generate(model, inputs, do_sample=False, max_new_tokens=NEW_TOKENS // 2, return_dict_in_generate=True)
    grown_mask = torch.cat([inputs["attention_mask"], torch.ones(2, NEW_TOKENS // 2).long()], 1)
    second = _generate(
        model,
        {"input_ids": first.sequences, "attention_mask": grown_mask},
        do_sample=False,
        max_new_tokens=NEW_TOKENS - NEW_TOKENS // 2,
        past_key_values=first.past_key_values,
    )
    assert torch.equal(second, whole)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_from_inputs_embeds_equals_from_input_ids(family):
    model = _lm(family)
    inputs = _left_padded_prompts(seed=8)
    from_ids = _generate(model, inputs, do_sample=False)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    from_embeds = _generate(
        model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}, do_sample=False
    )
    assert torch.equal(from_embeds, from_ids[:, PROMPT:])  # decoder-only models return only the new tokens
