"""Shared timing and reporting helpers for the hf-moe benchmarks (not part of the package).

Every benchmark times its cases round-robin in one process (the order is shuffled each round with a fixed seed), so
drift from the concurrent load on this machine hits every case alike; figures are medians over the timed rounds with
min-max, and every comparison is the median of the per-round ratios (case time / reference time in the same round).
"""

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def setup_threads(num_threads: int = 2):
    import torch

    torch.set_num_threads(num_threads)
    torch.manual_seed(0)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    """CPU, versions and load; imports nothing heavy (the conversion benchmark keeps its parent process small)."""
    from importlib.metadata import version

    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = ""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        pass
    isa = [name for name in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f" {name}" in flags]
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "isa": isa,
        "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else 2,
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "load_average_start": load_average(),
    }


_HZ = os.sysconf("SC_CLK_TCK")


def _busy_jiffies() -> tuple[int, int]:
    """(CPU jiffies spent by the whole machine, jiffies spent by this process's threads)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    machine = sum(values) - values[3] - values[4]  # minus idle and iowait
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])  # utime + stime of all threads
    return machine, own


class ForeignLoad:
    """Cores used by other processes while a block runs (from /proc/stat minus this process; 10 ms resolution)."""

    def __enter__(self):
        self.t0, (self.m0, self.o0) = time.perf_counter(), _busy_jiffies()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        m1, o1 = _busy_jiffies()
        self.cores = max(0.0, (m1 - self.m0) - (o1 - self.o0)) / _HZ / max(self.seconds, 1e-9)
        return False


def bench_round_robin(cases: dict, *, repeats: int, warmup: int = 1, seed: int = 0, budget_s: float | None = None,
                      min_repeats: int = 10, log=True, max_foreign: float | None = 0.5, retries: int = 2,
                      stats: dict | None = None) -> dict:
    """Time each zero-argument callable in `cases` `repeats` times, interleaved round by round (order shuffled).

    Contention guard: a call during which other processes used more than `max_foreign` cores (this machine has 2,
    shared with other agents' jobs) is discarded and rerun, at most `retries` times and only while the discarded
    time stays below half the kept time (so the guard costs at most 1.5x); the last try is kept whatever the load.
    Returns {name: [seconds per round]}; rounds stop early (not below `min_repeats`) once `budget_s` is spent.
    `stats`, if given, receives the foreign load of the kept calls and the number of discarded tries.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times = {name: [] for name in names}
    kept_load, discarded, kept_s, discarded_s = [], 0, 0.0, 0.0
    rng = random.Random(seed)
    start = time.perf_counter()
    for r in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            for attempt in range(retries + 1):
                with ForeignLoad() as load:
                    t0 = time.perf_counter()
                    cases[name]()
                    elapsed = time.perf_counter() - t0
                if (max_foreign is None or load.cores <= max_foreign or attempt == retries
                        or discarded_s + elapsed > 0.5 * kept_s):
                    break
                discarded += 1
                discarded_s += elapsed
            kept_s += elapsed
            times[name].append(elapsed)
            kept_load.append(load.cores)
        if log:
            print(f"  round {r + 1}/{repeats} ({time.perf_counter() - start:.0f}s, load {load_average()}, "
                  f"discarded so far {discarded})", flush=True)
        if budget_s is not None and r + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    if stats is not None:
        stats.setdefault("foreign_cores_of_kept_calls", []).extend(kept_load)
        stats["discarded_tries"] = stats.get("discarded_tries", 0) + discarded
    return times


def contention_summary(stats: dict) -> dict:
    loads = stats.get("foreign_cores_of_kept_calls", [])
    if not loads:
        return {}
    return {"foreign_cores_median": round(statistics.median(loads), 3), "foreign_cores_max": round(max(loads), 3),
            "calls_over_0.5_cores": sum(x > 0.5 for x in loads), "calls": len(loads),
            "discarded_tries": stats.get("discarded_tries", 0)}


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def paired_ratio(samples: list[float], reference: list[float]) -> dict:
    """Median (and min-max) over rounds of samples[i] / reference[i]: both timed in the same round."""
    ratios = [a / b for a, b in zip(samples, reference)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def fmt_ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.0f}–{s['max'] * 1e3:.0f})"


def fmt_ratio(r: dict | None) -> str:
    if r is None:
        return "–"
    return f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, markdown: str, quick: bool):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_quick" if quick else name
    payload = {**payload, "command": " ".join([Path(sys.executable).name, *sys.argv])}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"\nwrote {RESULTS / (stem + '.json')} and {RESULTS / (stem + '.md')}")


def machine_markdown(info: dict) -> str:
    text = (
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs ({', '.join(info['isa']) or 'no AVX'}), "
        f"torch {info['torch']} ({info['torch_threads']} threads), transformers {info['transformers']}, "
        f"Python {info['python']}. Load average (1/5/15 min) at start {info['load_average_start']}, "
        f"at end {info.get('load_average_end')}."
    )
    c = info.get("contention")
    if c:
        text += (
            f" Other processes' CPU use during the kept timed calls: median {c['foreign_cores_median']:.2f} cores, "
            f"max {c['foreign_cores_max']:.2f}; {c['calls_over_0.5_cores']} of {c['calls']} kept calls above 0.5 cores "
            f"after {c['discarded_tries']} contended tries were discarded and rerun."
        )
    return text
