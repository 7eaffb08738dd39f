"""SuperGLUE metrics as an `evaluate` module that loads from a local path (works offline).

    metric = evaluate.load("<site-packages>/hf_moe/metrics/super_glue", "cb")
    metric.compute(predictions=[0, 2, 1], references=[0, 1, 1])  # {'accuracy': ..., 'f1': ...}

Written for hf-moe from the metric definitions of the official SuperGLUE metric (huggingface/evaluate
`metrics/super_glue`); only numpy is needed:
- accuracy (boolq, copa, rte, wic, wsc, wsc.fixed, axg); accuracy and macro-F1 (cb); Matthews correlation (axb);
- multirc: predictions `{"idx": {"paragraph", "question", "answer"}, "prediction": 0/1}`, references 0/1; answers are
  grouped by (paragraph, question): `exact_match` = fraction of questions whose answers are all right, `f1_m` = mean
  over questions of the macro-F1 within the question, `f1_a` = binary F1 over all answers;
- record: predictions `{"idx": {"passage", "query"}, "prediction_text"}`, references `{"idx": ..., "answers": [...]}`;
  SQuAD-normalised exact match and token F1, max over the gold answers, mean over the referenced queries
  (a query without a prediction, or without gold answers, scores 0).
Macro-F1 averages over the labels present in the references or the predictions; an undefined F1 or Matthews
correlation is 0 (the scikit-learn convention the official metric relies on). All values are fractions in [0, 1].
"""

import re
import string
from collections import Counter

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
SuperGLUE metrics (hf-moe's offline copy): accuracy for boolq, copa, rte, wic, wsc, wsc.fixed, axg; accuracy and
macro-F1 for cb; Matthews correlation for axb; exact_match, f1_m and f1_a for multirc; exact_match and f1 for record.
"""

_CITATION = """\
@article{wang2019superglue,
  title={SuperGLUE: A Stickier Benchmark for General-Purpose Language Understanding Systems},
  author={Wang, Alex and Pruksachatkun, Yada and Nangia, Nikita and Singh, Amanpreet and Michael, Julian and \
Hill, Felix and Levy, Omer and Bowman, Samuel R},
  journal={arXiv preprint arXiv:1905.00537},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: label ids; for multirc dicts {"idx": {"paragraph", "question", "answer"}, "prediction"};
        for record dicts {"idx": {"passage", "query"}, "prediction_text"}.
    references: label ids; for record dicts {"idx": {"passage", "query"}, "answers": [str, ...]}.
Returns: "accuracy" (+ "f1" macro for cb), "matthews_correlation" (axb), "exact_match"/"f1_m"/"f1_a" (multirc),
    "exact_match"/"f1" (record).
"""

ACCURACY_CONFIGS = ("boolq", "copa", "rte", "wic", "wsc", "wsc.fixed", "axg")
CONFIGS = ACCURACY_CONFIGS + ("cb", "axb", "multirc", "record")


def accuracy(predictions, references):
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float(np.mean(predictions == references))


def _per_label_f1(predictions, references, labels):
    scores = []
    for label in labels:
        predicted, actual = predictions == label, references == label
        true_pos = int(np.sum(predicted & actual))
        denominator = 2 * true_pos + int(np.sum(predicted & ~actual)) + int(np.sum(~predicted & actual))
        scores.append(0.0 if denominator == 0 else 2 * true_pos / denominator)
    return scores


def binary_f1(predictions, references):
    """F1 of label 1: 2 TP / (2 TP + FP + FN); 0.0 when undefined."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    extra = set(np.unique(np.concatenate([predictions, references])).tolist()) - {0, 1}
    if extra:
        raise ValueError(f"binary F1 needs labels in {{0, 1}}; got also {sorted(extra)}")
    return float(_per_label_f1(predictions, references, [1])[0])


def macro_f1(predictions, references):
    """Unweighted mean of the per-label F1 over the labels seen in the references or the predictions."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    labels = np.unique(np.concatenate([references, predictions]))
    return float(np.mean(_per_label_f1(predictions, references, labels)))


def matthews_correlation(predictions, references):
    """Multi-class Matthews correlation from the confusion matrix; 0.0 when undefined."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    labels, encoded = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (encoded[: len(references)], encoded[len(references) :]), 1.0)
    true_totals, pred_totals = confusion.sum(axis=1), confusion.sum(axis=0)
    total, correct = confusion.sum(), np.trace(confusion)
    cov_true_pred = correct * total - np.dot(true_totals, pred_totals)
    cov_pred_pred = total * total - np.dot(pred_totals, pred_totals)
    cov_true_true = total * total - np.dot(true_totals, true_totals)
    if cov_pred_pred * cov_true_true == 0:
        return 0.0
    return float(cov_true_pred / np.sqrt(cov_true_true * cov_pred_pred))


def multirc_scores(predictions, references):
    """MultiRC exact match / per-question macro-F1 / answer-level F1 (see the module docstring)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    questions = {}
    for prediction, reference in zip(predictions, references):
        key = (int(prediction["idx"]["paragraph"]), int(prediction["idx"]["question"]))
        questions.setdefault(key, ([], []))
        questions[key][0].append(int(prediction["prediction"]))
        questions[key][1].append(int(reference))
    if not questions:
        raise ValueError("multirc needs at least one answer")
    exact, f1_per_question = [], []
    for question_predictions, question_references in questions.values():
        question_predictions, question_references = np.asarray(question_predictions), np.asarray(question_references)
        exact.append(float(np.all(question_predictions == question_references)))
        f1_per_question.append(macro_f1(question_predictions, question_references))
    all_predictions = [int(p["prediction"]) for p in predictions]
    return {
        "exact_match": float(sum(exact) / len(exact)),
        "f1_m": float(sum(f1_per_question) / len(f1_per_question)),
        "f1_a": binary_f1(all_predictions, [int(r) for r in references]),
    }


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text):
    """SQuAD normalisation: lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction, gold):
    predicted_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    overlap = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def record_scores(predictions, references):
    """ReCoRD exact match and F1 (see the module docstring)."""
    if not references:
        raise ValueError("record needs at least one reference")

    def key(item):
        return (int(item["idx"]["passage"]), int(item["idx"]["query"]))

    predicted_text = {key(p): p["prediction_text"] for p in predictions}
    total_exact = total_f1 = 0.0
    for reference in references:
        prediction, golds = predicted_text.get(key(reference)), list(reference["answers"])
        if prediction is None or not golds:
            continue
        total_exact += max(exact_match(prediction, gold) for gold in golds)
        total_f1 += max(token_f1(prediction, gold) for gold in golds)
    return {"exact_match": total_exact / len(references), "f1": total_f1 / len(references)}


def _features(config_name):
    if config_name == "record":
        idx = {"passage": datasets.Value("int64"), "query": datasets.Value("int64")}
        return datasets.Features(
            {
                "predictions": {"idx": idx, "prediction_text": datasets.Value("string")},
                "references": {"idx": idx, "answers": datasets.Sequence(datasets.Value("string"))},
            }
        )
    if config_name == "multirc":
        idx = {name: datasets.Value("int64") for name in ("answer", "paragraph", "question")}
        return datasets.Features(
            {"predictions": {"idx": idx, "prediction": datasets.Value("int64")}, "references": datasets.Value("int64")}
        )
    return datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SuperGlue(evaluate.Metric):
    def _info(self):
        if self.config_name not in CONFIGS:
            raise KeyError(
                f"You should supply a configuration name selected in {list(CONFIGS)}; got {self.config_name!r}"
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_features(self.config_name),
            codebase_urls=[],
            reference_urls=["https://super.gluebenchmark.com/"],
            format="numpy" if self.config_name not in ("record", "multirc") else None,
        )

    def _compute(self, predictions, references):
        if self.config_name == "cb":
            return {"accuracy": accuracy(predictions, references), "f1": macro_f1(predictions, references)}
        if self.config_name == "axb":
            return {"matthews_correlation": matthews_correlation(predictions, references)}
        if self.config_name == "multirc":
            return multirc_scores(predictions, references)
        if self.config_name == "record":
            return record_scores(predictions, references)
        return {"accuracy": accuracy(predictions, references)}
