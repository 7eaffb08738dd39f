"""GLUE and SuperGLUE tasks: data (Hub or local files), preprocessing into model inputs, and the official metrics.

    from hf_moe.tasks import get_task
    task = get_task("mrpc")
    dev = task.load("validation", data_dir="../shared/data")        # or $HF_MOE_DATA_DIR; None = the Hub
    encoded = dev.map(task.preprocess(tokenizer), batched=True, remove_columns=dev.column_names)
    task.compute_metrics(logits, dev["label"])                       # {"accuracy": ..., "f1": ...}
    trainer = Trainer(..., compute_metrics=task.compute_metrics_fn(dev))

The metrics are the `evaluate` modules shipped in `hf_moe/metrics/` (see `load_metric`), so evaluation runs offline.
"""

from .metrics import METRIC_KEYS, load_metric, metric_path
from .preprocessing import ensure_pad_token
from .registry import GLUE_TASKS, SUPER_GLUE_TASKS, TASKS, get_task
from .splits import stratified_split
from .task import DATA_DIR_ENV, MULTIPLE_CHOICE, REGRESSION, SINGLE_LABEL, Task

__all__ = [
    "DATA_DIR_ENV",
    "GLUE_TASKS",
    "METRIC_KEYS",
    "MULTIPLE_CHOICE",
    "REGRESSION",
    "SINGLE_LABEL",
    "SUPER_GLUE_TASKS",
    "TASKS",
    "Task",
    "ensure_pad_token",
    "get_task",
    "load_metric",
    "metric_path",
    "stratified_split",
]
