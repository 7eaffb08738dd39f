"""Router telemetry callback: logged statistics, the HyperRouter k schedule, and the end-of-training artefacts."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import hf_moe
from hf_moe.training import RouterTelemetryCallback, RoutingProbe, hyperrouter_k

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


PROBE_CONFIGS = {
    "topk": lambda: hf_moe.TopKMoeConfig(text_config=BERT, num_experts=4, num_experts_per_tok=2, num_labels=2),
    "dynamic": lambda: hf_moe.DynamicMoeConfig(text_config=BERT, num_experts=4, router_top_p=0.6, num_labels=2),
    "mh_moe": lambda: hf_moe.MultiHeadMoeConfig(text_config=BERT, num_experts=4, num_experts_per_tok=1,
                                                moe_num_heads=2, num_labels=2),
    "hyperrouter": lambda: hf_moe.HyperRouterConfig(text_config=BERT, num_experts=4, num_experts_per_tok=2,
                                                    num_labels=2),
    "hypermoe": lambda: hf_moe.HyperMoeConfig(text_config=BERT, num_experts=4, num_experts_per_tok=2, num_labels=2),
}


def _selected_by_loop(probs, rule, k, p):
    """The expert ids one (sub-)token selects, from its router probabilities, written out."""
    order = sorted(range(len(probs)), key=lambda e: -probs[e])
    if rule != "top_p":
        return set(order[:k])
    chosen, mass = set(), 0.0
    for e in order:
        chosen.add(e)
        mass += probs[e]
        if mass > p:
            break
    return chosen


@pytest.mark.parametrize("name", sorted(PROBE_CONFIGS))
def test_routing_probe_counts_what_each_token_and_sequence_selects(name):
    config = PROBE_CONFIGS[name]()
    torch.manual_seed(0)
    model = hf_moe.MODEL_CLASSES[hf_moe.get_family(config.model_type).class_prefix, "ForSequenceClassification"](config)
    model.eval()
    data = _dataset(n=6, seq=10)
    ids, mask = torch.tensor(data["input_ids"]), torch.tensor(data["attention_mask"])
    experts_out, layer_out = [], []
    hooks = [block.moe.experts.register_forward_hook(lambda m, a, o: experts_out.append(o))
             for block in model.moe_blocks()]
    hooks += [block.moe.register_forward_hook(lambda m, a, o: layer_out.append(o.hidden_states))
              for block in model.moe_blocks()]
    with torch.no_grad(), RoutingProbe(model) as probe:
        logits = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    for hook in hooks:
        hook.remove()
    figures = probe.figures()

    rule = "top_p" if name == "dynamic" else "top_k"
    heads = getattr(config, "moe_num_heads", 1)
    token_counts, sequence_fractions = [], []
    for layer_logits in logits:
        probs = layer_logits.double().softmax(-1).view(6, 10, heads, 4).tolist()
        for b in range(6):
            union = set()
            for s in range(10):
                if not mask[b, s]:
                    continue
                token = set().union(*(_selected_by_loop(probs[b][s][h], rule, 2 if name != "mh_moe" else 1, 0.6)
                                      for h in range(heads)))
                token_counts.append(len(token))
                union |= token
            sequence_fractions.append(len(union) / 4)
    per_token = sum(token_counts) / len(token_counts)
    assert figures["experts_per_token"] == pytest.approx(per_token, rel=1e-12)
    assert figures["token_expert_fraction"] == pytest.approx(per_token / 4, rel=1e-12)
    assert figures["sequence_expert_fraction"] == pytest.approx(sum(sequence_fractions) / len(sequence_fractions))
    if name != "hypermoe":
        assert "hyper_expert_share" not in figures
        return
    real = mask.reshape(-1).bool()
    hyper = torch.cat([(o.reshape(-1, o.shape[-1]) - e)[real] for o, e in zip(layer_out, experts_out)]).double()
    experts = torch.cat([e[real] for e in experts_out]).double()
    share = (hyper.square().sum() / experts.square().sum()).sqrt().item()
    assert share > 0
    assert figures["hyper_expert_share"] == pytest.approx(share, rel=1e-4)
