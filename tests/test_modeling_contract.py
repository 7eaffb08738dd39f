"""Parts of transformers' model contract beyond tests/test_conformance.py: one graph under torch.compile with the
default `eager` experts (they run transformers' `grouped_mm` while compiling)."""

import pytest
import torch
from models_common import (
    FAMILIES,
    dropout_free,
    make_model,
    model_depth,
    random_ids,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_experts_compile_as_one_graph(family, assert_fp32_close):
    model = make_model(family, "llama", "ForCausalLM", text_overrides=dropout_free("llama")).eval()
    assert model.config._experts_implementation == "eager"
    ids = random_ids((2, 8), seed=1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    with torch.no_grad():
        expected = model(**inputs)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)
    depth = model_depth(model)
    assert_fp32_close(out.logits, expected.logits, depth, "compiled logits")
    assert_fp32_close(out.aux_loss, expected.aux_loss, depth, "compiled aux_loss")


def test_trainer_predictions_hold_the_logits_and_aux_loss_only(tmp_path):
    # every forward returns per-layer `router_stats` (read by the telemetry callback); evaluation must not gather them
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = make_model("TopKMoe", "bert", "ForSequenceClassification")
    ids = random_ids((6, 8), seed=2)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": [0, 1, 2, 0, 1, 2]})
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=4)
    predictions = Trainer(model=model, args=args).predict(dataset).predictions
    logits, aux_loss = predictions  # per batch: logits [4 | 2, labels], the scalar aux loss
    assert logits.shape == (6, 3) and aux_loss.shape == (2,)
