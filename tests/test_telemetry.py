"""Router telemetry callback: logged statistics, the HyperRouter k schedule, and the end-of-training artefacts."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import hf_moe
from hf_moe.training import RouterTelemetryCallback, hyperrouter_k

BERT = {"model_type": "bert", "vocab_size": 60, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _dataset(n=64, seq=12):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (n, seq), generator=generator)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::3, 8:] = 0  # padding on every third row
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                              "labels": (ids[:, 0] > 30).long().tolist()})


def _train(tmp_path, config, callback, steps=8):
    torch.manual_seed(0)
    model = hf_moe.MODEL_CLASSES[hf_moe.get_family(config.model_type).class_prefix, "ForSequenceClassification"](config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                             logging_steps=2, report_to="none", use_cpu=True, save_strategy="no", learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[callback])
    trainer.train()
    return model, [log for log in trainer.state.log_history if "loss" in log]


def test_hyperrouter_schedule_is_linear_and_clipped():
    assert [hyperrouter_k(t, 8, 2, 6) for t in range(0, 10)] == [2, 2, 3, 4, 4, 4, 5, 6, 6, 6]


def test_topk_logs_and_artefacts(tmp_path):
    config = hf_moe.TopKMoeConfig(text_config=BERT, num_experts=4, num_experts_per_tok=2, num_labels=2)
    _, logs = _train(tmp_path, config, RouterTelemetryCallback())
    assert len(logs) == 4
    for log in logs:
        assert log["router/experts_per_token"] == pytest.approx(2.0)
        assert log["router/aux_loss"] > 0
        assert 0 < log["router/entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
        assert log["router/layer_0/load_max_over_mean"] >= 1.0
    stats = json.loads((tmp_path / "router_stats.json").read_text())
    assert stats["forwards"] == 8 and len(stats["layers"]) == 2
    for row in stats["expert_load"]:
        assert sum(row) == pytest.approx(2.0)  # each token sends to exactly k experts
    assert (tmp_path / "expert_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hyperrouter_k_schedule_drives_training(tmp_path):
    config = hf_moe.HyperRouterConfig(text_config=BERT, num_experts=4, num_experts_per_tok=1, num_labels=2)
    model, logs = _train(tmp_path, config, RouterTelemetryCallback(k_schedule=(1, 4)))
    used = [log["router/experts_per_token"] for log in logs]
    assert used == sorted(used) and used[0] < used[-1] <= 4
    assert model.config.num_experts_per_tok == hyperrouter_k(7, 8, 1, 4)


def test_dynamic_reports_variable_experts(tmp_path):
    config = hf_moe.DynamicMoeConfig(text_config=BERT, num_experts=4, router_top_p=0.6, num_labels=2)
    _, logs = _train(tmp_path, config, RouterTelemetryCallback(), steps=4)
    assert all(1.0 <= log["router/experts_per_token"] <= 4.0 for log in logs)
