"""GLUE metrics as an `evaluate` module that loads from a local path (works offline).

    metric = evaluate.load("<site-packages>/hf_moe/metrics/glue", "mrpc")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {'accuracy': ..., 'f1': ...}

Written for hf-moe from the metric definitions of the official GLUE metric (huggingface/evaluate `metrics/glue`):
accuracy, binary F1 (positive label 1), Matthews correlation, Pearson and Spearman correlation. Only numpy is
needed; each formula follows the scikit-learn/scipy convention the official metric relies on, degenerate cases
included (an undefined F1 is 0, an undefined Matthews correlation is 0, a correlation with a constant input is nan).
All values are fractions in [0, 1] (or [-1, 1] for the correlations).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
GLUE metrics (hf-moe's offline copy): `accuracy` for sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans;
`accuracy` and binary `f1` for mrpc and qqp; `matthews_correlation` for cola; `pearson` and `spearmanr` for stsb.
"""

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label ids (a float score per example for stsb).
    references: gold label ids (a float score per example for stsb).
Returns: a dict with the task's keys:
    "accuracy" (sst2, mnli*, qnli, rte, wnli, hans, mrpc, qqp), "f1" (mrpc, qqp; positive label 1),
    "matthews_correlation" (cola), "pearson" and "spearmanr" (stsb).
"""

ACCURACY_CONFIGS = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans")
F1_CONFIGS = ("mrpc", "qqp")
CONFIGS = ACCURACY_CONFIGS + F1_CONFIGS + ("cola", "stsb")


def accuracy(predictions, references):
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float(np.mean(predictions == references))


def binary_f1(predictions, references, positive=1):
    """F1 of the positive class: 2 TP / (2 TP + FP + FN); 0.0 when it is undefined (no positive at all)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    extra = set(np.unique(np.concatenate([predictions, references])).tolist()) - {0, 1, positive}
    if extra:
        raise ValueError(f"binary F1 needs labels in {{0, 1}}; got also {sorted(extra)}")
    predicted, actual = predictions == positive, references == positive
    true_pos = int(np.sum(predicted & actual))
    denominator = 2 * true_pos + int(np.sum(predicted & ~actual)) + int(np.sum(~predicted & actual))
    return 0.0 if denominator == 0 else float(2 * true_pos / denominator)


def matthews_correlation(predictions, references):
    """Multi-class Matthews correlation from the confusion matrix (Gorodkin's R_K); 0.0 when undefined."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    labels, encoded = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    k = len(labels)
    true_ids, pred_ids = encoded[: len(references)], encoded[len(references) :]
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (true_ids, pred_ids), 1.0)
    true_totals, pred_totals = confusion.sum(axis=1), confusion.sum(axis=0)
    total, correct = confusion.sum(), np.trace(confusion)
    cov_true_pred = correct * total - np.dot(true_totals, pred_totals)
    cov_pred_pred = total * total - np.dot(pred_totals, pred_totals)
    cov_true_true = total * total - np.dot(true_totals, true_totals)
    if cov_pred_pred * cov_true_true == 0:
        return 0.0
    return float(cov_true_pred / np.sqrt(cov_true_true * cov_pred_pred))


def pearson(x, y):
    """Pearson's r on float64 values; nan when either input is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("pearson needs two 1-D sequences of the same length >= 2")
    dx, dy = x - x.mean(), y - y.mean()
    scale_x, scale_y = np.abs(dx).max(), np.abs(dy).max()
    if scale_x == 0 or scale_y == 0:
        return float("nan")
    dx, dy = dx / scale_x, dy / scale_y  # rescale first: avoids overflow/underflow in the norms
    r = np.dot(dx / np.linalg.norm(dx), dy / np.linalg.norm(dy))
    return float(min(max(r, -1.0), 1.0))


def average_ranks(values):
    """Ranks 1..n; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(np.asarray(values), return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(x, y):
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    def _info(self):
        if self.config_name not in CONFIGS:
            raise KeyError(
                f"You should supply a configuration name selected in {list(CONFIGS)}; got {self.config_name!r}"
            )
        value_type = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(value_type), "references": datasets.Value(value_type)}
            ),
            codebase_urls=[],
            reference_urls=["https://gluebenchmark.com/"],
            format=None,  # python lists: the numpy formatter would turn float64 scores into float32
        )

    def _compute(self, predictions, references):
        if self.config_name == "cola":
            return {"matthews_correlation": matthews_correlation(predictions, references)}
        if self.config_name == "stsb":
            return {"pearson": pearson(predictions, references), "spearmanr": spearman(predictions, references)}
        if self.config_name in F1_CONFIGS:
            return {"accuracy": accuracy(predictions, references), "f1": binary_f1(predictions, references)}
        return {"accuracy": accuracy(predictions, references)}
