"""Greedy generation of the causal-LM heads (llama and gpt2 backbones, every family): KV-cached `generate` equals
uncached `generate` and a manual argmax loop over full-sequence forwards; left padding changes nothing."""

import pytest
import torch
from models_common import FAMILIES, make_model, random_ids

pytestmark = pytest.mark.usefixtures("single_thread")

NEW_TOKENS = 20
CASES = [pytest.param(f, b, id=f"{f}-{b}") for b in ("llama", "gpt2") for f in FAMILIES]


def _greedy(model, input_ids, attention_mask=None, use_cache=True):
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        use_cache=use_cache,
        eos_token_id=None,  # always NEW_TOKENS tokens
        pad_token_id=0,
    )


def _manual_greedy(model, input_ids):
    sequence = input_ids
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False).logits
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence


@pytest.mark.parametrize("family, backbone", CASES)
def test_greedy_generate_cache_equals_no_cache_equals_manual_loop(family, backbone):
    model = make_model(family, backbone, "ForCausalLM").eval()
    prompt = random_ids((2, 5), seed=11)
    with torch.no_grad():
        cached = _greedy(model, prompt, use_cache=True)
        uncached = _greedy(model, prompt, use_cache=False)
    manual = _manual_greedy(model, prompt)
    assert cached.shape == (2, 5 + NEW_TOKENS)
    assert torch.equal(cached, manual), (cached, manual)
    assert torch.equal(uncached, manual), (uncached, manual)
    # the continuation is not trivial (a constant token would hide routing errors)
    assert cached[:, 5:].unique().numel() > 1


@pytest.mark.parametrize("family, backbone", CASES)
def test_left_padded_batch_generates_as_each_prompt_alone(family, backbone):
    model = make_model(family, backbone, "ForCausalLM").eval()
    long_prompt = random_ids((1, 6), seed=12)
    short_prompt = random_ids((1, 3), seed=13)
    batch = torch.cat([long_prompt, torch.cat([torch.zeros(1, 3, dtype=torch.long), short_prompt], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        together = _greedy(model, batch, mask, use_cache=True)
        together_uncached = _greedy(model, batch, mask, use_cache=False)
        alone_long = _greedy(model, long_prompt)
        alone_short = _greedy(model, short_prompt)
    assert torch.equal(together, together_uncached)
    assert torch.equal(together[0], alone_long[0])
    assert torch.equal(together[1, 3:], alone_short[0])
