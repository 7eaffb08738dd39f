"""The shipped `evaluate` metric modules (`hf_moe/metrics/glue`, `hf_moe/metrics/super_glue`), loaded by local path.

    load_metric("glue", "mrpc").compute(predictions=[...], references=[...])

`evaluate.load` copies the script into `$HF_HOME/modules` (or `$HF_MODULES_CACHE`) and takes file locks there; no
network access is needed. Loaded metrics are cached per process and keep their data in memory.
"""

from __future__ import annotations

import functools
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"
METRIC_MODULES = ("glue", "super_glue")

METRIC_KEYS = {
    ("glue", "cola"): ("matthews_correlation",),
    ("glue", "stsb"): ("pearson", "spearmanr"),
    ("glue", "mrpc"): ("accuracy", "f1"),
    ("glue", "qqp"): ("accuracy", "f1"),
    **{
        ("glue", name): ("accuracy",)
        for name in ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans")
    },
    ("super_glue", "cb"): ("accuracy", "f1"),
    ("super_glue", "axb"): ("matthews_correlation",),
    ("super_glue", "multirc"): ("exact_match", "f1_m", "f1_a"),
    ("super_glue", "record"): ("exact_match", "f1"),
    **{("super_glue", name): ("accuracy",) for name in ("boolq", "copa", "rte", "wic", "wsc", "wsc.fixed", "axg")},
}


def metric_path(module: str) -> str:
    """Folder of a shipped metric module (what `evaluate.load` takes)."""
    if module not in METRIC_MODULES:
        raise ValueError(f"unknown metric module {module!r}; valid: {list(METRIC_MODULES)}")
    return str(METRICS_DIR / module)


@functools.cache
def load_metric(module: str, config_name: str):
    """`evaluate.load(<hf_moe/metrics/module>, config_name)`, cached, data kept in memory."""
    import evaluate

    if (module, config_name) not in METRIC_KEYS:
        valid = sorted(name for m, name in METRIC_KEYS if m == module)
        raise ValueError(f"unknown {module} metric config {config_name!r}; valid: {valid}")
    return evaluate.load(metric_path(module), config_name, keep_in_memory=True)
