"""The shipped GLUE/SuperGLUE `evaluate` modules against scikit-learn/scipy on real dev-set labels.

Gold labels are read here with plain csv/json code (independent of hf_moe) from ../shared/data; predictions are the
gold labels with a seeded fraction changed (plus constant predictions, the degenerate cases). Each module result must
equal the reference computed with scikit-learn/scipy (MultiRC: a hand-written grouping around scikit-learn; ReCoRD:
a hand-written SQuAD-style scorer on a small hand-made example, as ReCoRD is not in the local data).
"""

import atexit
import csv
import json
import os
import shutil
import string
import tempfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def _point_evaluate_cache_at_tmp():
    """evaluate copies metric scripts and takes file locks under its cache: use one temp dir for the test session."""
    root = os.environ.get("HF_MOE_TEST_EVALUATE_CACHE")
    if root is None:
        root = tempfile.mkdtemp(prefix="hf_moe_evaluate_")
        os.environ["HF_MOE_TEST_EVALUATE_CACHE"] = root
        atexit.register(shutil.rmtree, root, True)
    import evaluate.config

    evaluate.config.HF_MODULES_CACHE = Path(root) / "modules"
    evaluate.config.HF_EVALUATE_CACHE = Path(root) / "evaluate"
    evaluate.config.HF_METRICS_CACHE = Path(root) / "metrics"
    return root


EVALUATE_CACHE = _point_evaluate_cache_at_tmp()

import evaluate  # noqa: E402

from hf_moe.tasks import TASKS, get_task, metric_path  # noqa: E402

DATA = Path(os.environ.get("HF_MOE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"GLUE/SuperGLUE data not found at {DATA}")

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 1.0)
TOL = dict(rel=1e-9, abs=1e-12)


# -- gold labels, read without hf_moe ---------------------------------------------------------------------------------


def _tsv(path, header=True):
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if not header:
        return rows
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


NLI2 = {"entailment": 0, "not_entailment": 1}
NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}
CB = {"entailment": 0, "contradiction": 1, "neutral": 2}


def gold(source):
    """Gold ids of a local labelled split, by a short name."""
    g, s = DATA / "glue", DATA / "super_glue"
    readers = {
        "cola": lambda: [int(row[1]) for row in _tsv(g / "CoLA/dev.tsv", header=False)],
        "sst2": lambda: [int(row["label"]) for row in _tsv(g / "SST-2/dev.tsv")],
        "mrpc": lambda: [int(row["Quality"]) for row in _tsv(g / "MRPC/dev.tsv")],
        "stsb": lambda: [float(row["score"]) for row in _tsv(g / "STS-B/dev.tsv")],
        "mnli": lambda: [NLI3[row["label"]] for row in _jsonl(g / "MNLI/dev.jsonl")],
        "qnli": lambda: [NLI2[row["label"]] for row in _tsv(g / "QNLI/dev.tsv")],
        "rte": lambda: [NLI2[row["label"]] for row in _tsv(g / "RTE/dev.tsv")],
        "rte_train": lambda: [NLI2[row["label"]] for row in _tsv(g / "RTE/train.tsv")],
        "wnli": lambda: [int(row["label"]) for row in _tsv(g / "WNLI/dev.tsv")],
        "boolq": lambda: [int(row["label"]) for row in _jsonl(s / "BoolQ/val.jsonl")],
        "cb": lambda: [CB[row["label"]] for row in _jsonl(s / "CB/val.jsonl")],
        "copa": lambda: [int(row["label"]) for row in _jsonl(s / "COPA/val.jsonl")],
        "superglue_rte": lambda: [NLI2[row["label"]] for row in _jsonl(s / "RTE/val.jsonl")],
        "wic": lambda: [int(row["label"]) for row in _jsonl(s / "WiC/val.jsonl")],
        "wsc": lambda: [int(row["label"]) for row in _jsonl(s / "WSC/val.jsonl")],
        "axb": lambda: [NLI2[row["label"]] for row in _jsonl(s / "AX-b/AX-b.jsonl")],
        "axg": lambda: [NLI2[row["label"]] for row in _jsonl(s / "AX-g/AX-g.jsonl")],
    }
    return np.asarray(readers[source]())


def multirc_gold():
    """(idx dicts, labels) of MultiRC val, flattened to answers in file order."""
    idx, labels = [], []
    for row in _jsonl(DATA / "super_glue/MultiRC/val.jsonl"):
        for question in row["passage"]["questions"]:
            for answer in question["answers"]:
                idx.append({"paragraph": row["idx"], "question": question["idx"], "answer": answer["idx"]})
                labels.append(int(answer["label"]))
    return idx, np.asarray(labels)


# -- perturbed predictions and references ------------------------------------------------------------------------------


def perturbed(labels, fraction, num_classes, seed=0):
    """`labels` with round(fraction * n) seeded positions changed to another class."""
    rng = np.random.default_rng(seed)
    predictions = labels.copy()
    positions = rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)
    shift = rng.integers(1, num_classes, size=len(positions))
    predictions[positions] = (labels[positions] + shift) % num_classes
    return predictions


def prediction_sets(labels, num_classes):
    sets = [perturbed(labels, f, num_classes, seed=i) for i, f in enumerate(FRACTIONS)]
    sets += [np.zeros_like(labels), np.full_like(labels, num_classes - 1)]  # constant predictions: degenerate cases
    return sets


def reference(kind, predictions, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on ill-defined F1 / MCC (it then returns 0)
        if kind == "accuracy":
            return {"accuracy": accuracy_score(labels, predictions)}
        if kind == "acc_f1":
            return {"accuracy": accuracy_score(labels, predictions), "f1": f1_score(labels, predictions)}
        if kind == "acc_macro_f1":
            return {
                "accuracy": accuracy_score(labels, predictions),
                "f1": f1_score(labels, predictions, average="macro"),
            }
        if kind == "mcc":
            return {"matthews_correlation": matthews_corrcoef(labels, predictions)}
        if kind == "corr":
            return {"pearson": pearsonr(predictions, labels)[0], "spearmanr": spearmanr(predictions, labels)[0]}
    raise KeyError(kind)


# (module, config, gold source, number of classes, reference kind). QQP has no local data: MRPC's dev labels stand in;
# HANS (accuracy) uses RTE train labels.
CASES = [
    ("glue", "cola", "cola", 2, "mcc"),
    ("glue", "sst2", "sst2", 2, "accuracy"),
    ("glue", "mrpc", "mrpc", 2, "acc_f1"),
    ("glue", "qqp", "mrpc", 2, "acc_f1"),
    ("glue", "mnli", "mnli", 3, "accuracy"),
    ("glue", "mnli_matched", "mnli", 3, "accuracy"),
    ("glue", "mnli_mismatched", "mnli", 3, "accuracy"),
    ("glue", "qnli", "qnli", 2, "accuracy"),
    ("glue", "rte", "rte", 2, "accuracy"),
    ("glue", "wnli", "wnli", 2, "accuracy"),
    ("glue", "hans", "rte_train", 2, "accuracy"),
    ("super_glue", "boolq", "boolq", 2, "accuracy"),
    ("super_glue", "cb", "cb", 3, "acc_macro_f1"),
    ("super_glue", "copa", "copa", 2, "accuracy"),
    ("super_glue", "rte", "superglue_rte", 2, "accuracy"),
    ("super_glue", "wic", "wic", 2, "accuracy"),
    ("super_glue", "wsc", "wsc", 2, "accuracy"),
    ("super_glue", "wsc.fixed", "wsc", 2, "accuracy"),
    ("super_glue", "axb", "axb", 2, "mcc"),
    ("super_glue", "axg", "axg", 2, "accuracy"),
]


def _load(module, config):
    return evaluate.load(metric_path(module), config, keep_in_memory=True)


@needs_data
@pytest.mark.parametrize("module,config,source,num_classes,kind", CASES, ids=[f"{m}-{c}" for m, c, *_ in CASES])
def test_classification_metric_matches_sklearn(module, config, source, num_classes, kind):
    labels = gold(source)
    metric = _load(module, config)
    for predictions in prediction_sets(labels, num_classes):
        result = metric.compute(predictions=predictions.tolist(), references=labels.tolist())
        expected = reference(kind, predictions, labels)
        assert set(result) == set(expected)
        for key, value in expected.items():
            assert isinstance(result[key], float)
            assert result[key] == pytest.approx(value, **TOL), (config, key)


@needs_data
def test_stsb_metric_matches_scipy():
    labels = gold("stsb")
    assert len(labels) == 1500
    rng = np.random.default_rng(0)
    prediction_list = [
        labels,
        labels + rng.normal(0, 0.5, len(labels)),
        np.round(labels + rng.normal(0, 1.5, len(labels))),  # many ties (Spearman's average ranks)
        5.0 - labels,
        rng.uniform(0, 5, len(labels)),
    ]
    metric = _load("glue", "stsb")
    for predictions in prediction_list:
        result = metric.compute(predictions=predictions.tolist(), references=labels.tolist())
        expected = reference("corr", predictions, labels)
        assert set(result) == {"pearson", "spearmanr"}
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, **TOL), key
    constant = metric.compute(predictions=[2.0] * len(labels), references=labels.tolist())
    assert np.isnan(constant["pearson"]) and np.isnan(constant["spearmanr"])  # scipy: undefined -> nan


def macro_f1_by_hand(predictions, labels):
    """Mean over the labels present (in labels or predictions) of 2 TP / (2 TP + FP + FN)."""
    scores = []
    for c in sorted(set(predictions) | set(labels)):
        tp = sum(p == c and label == c for p, label in zip(predictions, labels))
        fp = sum(p == c and label != c for p, label in zip(predictions, labels))
        fn = sum(p != c and label == c for p, label in zip(predictions, labels))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def multirc_reference(idx, predictions, labels, check_with_sklearn=20):
    """EM / mean per-question macro-F1 / answer-level F1 (scikit-learn), grouping by (paragraph, question).

    The per-question macro-F1 is written out by hand (scikit-learn's f1_score costs ~4 ms a call, x 953 questions);
    the first `check_with_sklearn` questions are checked against scikit-learn's average="macro"."""
    groups = defaultdict(list)
    for i, p, label in zip(idx, predictions.tolist(), labels.tolist()):
        groups[(i["paragraph"], i["question"])].append((p, label))
    f1s = [macro_f1_by_hand([p for p, _ in g], [label for _, label in g]) for g in groups.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g, mine in list(zip(groups.values(), f1s))[:check_with_sklearn]:
            assert mine == pytest.approx(
                f1_score([label for _, label in g], [p for p, _ in g], average="macro"), abs=1e-12
            )
        f1_a = f1_score(labels, predictions)
    ems = [all(p == label for p, label in g) for g in groups.values()]
    return {"exact_match": np.mean(ems), "f1_m": np.mean(f1s), "f1_a": f1_a}


@needs_data
def test_multirc_metric_matches_reference():
    idx, labels = multirc_gold()
    assert len(labels) == 4848 and len({(i["paragraph"], i["question"]) for i in idx}) == 953
    metric = _load("super_glue", "multirc")
    for predictions in prediction_sets(labels, 2):
        result = metric.compute(
            predictions=[{"idx": i, "prediction": int(p)} for i, p in zip(idx, predictions)], references=labels.tolist()
        )
        expected = multirc_reference(idx, predictions, labels)
        assert set(result) == set(expected)
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, **TOL), key
    perfect = metric.compute(
        predictions=[{"idx": i, "prediction": int(label)} for i, label in zip(idx, labels)], references=labels.tolist()
    )
    assert perfect == {"exact_match": 1.0, "f1_m": 1.0, "f1_a": 1.0}


# -- ReCoRD: a hand-made example ---------------------------------------------------------------------------------------


def squad_normalise(text):
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def squad_f1(prediction, gold_text):
    p, g = squad_normalise(prediction).split(), squad_normalise(gold_text).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


RECORD_REFERENCES = [
    {"idx": {"passage": 0, "query": 10}, "answers": ["Eiffel Tower", "the Eiffel Tower"]},
    {"idx": {"passage": 0, "query": 11}, "answers": ["U.S."]},
    {"idx": {"passage": 1, "query": 12}, "answers": ["Barack Obama", "Obama"]},
    {"idx": {"passage": 1, "query": 13}, "answers": ["New York City"]},
    {"idx": {"passage": 2, "query": 14}, "answers": ["Manchester United"]},  # unanswered: scores 0
]
RECORD_PREDICTIONS = [
    {"idx": {"passage": 0, "query": 10}, "prediction_text": "The  Eiffel tower!"},  # EM after normalisation
    {"idx": {"passage": 0, "query": 11}, "prediction_text": "US"},  # "U.S." -> "us": EM
    {"idx": {"passage": 1, "query": 12}, "prediction_text": "President Obama"},  # F1 max over golds: 2/3 vs "Obama"
    {"idx": {"passage": 1, "query": 13}, "prediction_text": "York"},  # F1 = 2 * 1 * 1/3 / (4/3) = 0.5
    {"idx": {"passage": 2, "query": 99}, "prediction_text": "Manchester United"},  # not a referenced query
]


def test_record_metric_matches_hand_reference():
    metric = _load("super_glue", "record")
    result = metric.compute(predictions=RECORD_PREDICTIONS, references=RECORD_REFERENCES)
    predicted = {p["idx"]["query"]: p["prediction_text"] for p in RECORD_PREDICTIONS}
    em = f1 = 0.0
    for ref in RECORD_REFERENCES:
        if ref["idx"]["query"] in predicted:
            text = predicted[ref["idx"]["query"]]
            em += max(float(squad_normalise(text) == squad_normalise(a)) for a in ref["answers"])
            f1 += max(squad_f1(text, a) for a in ref["answers"])
    expected = {"exact_match": em / len(RECORD_REFERENCES), "f1": f1 / len(RECORD_REFERENCES)}
    assert expected == pytest.approx({"exact_match": 2 / 5, "f1": (1 + 1 + 2 / 3 + 0.5) / 5})  # worked out by hand
    assert result == pytest.approx(expected, **TOL)


# -- the tasks' compute_metrics use the modules ------------------------------------------------------------------------

TASK_GOLD = {
    "cola": ("cola", "validation"),
    "sst2": ("sst2", "validation"),
    "mrpc": ("mrpc", "validation"),
    "mnli": ("mnli", "validation_matched"),
    "qnli": ("qnli", "validation"),
    "rte": ("rte", "validation"),
    "wnli": ("wnli", "validation"),
    "boolq": ("boolq", "validation"),
    "cb": ("cb", "validation"),
    "copa": ("copa", "validation"),
    "superglue_rte": ("superglue_rte", "validation"),
    "wic": ("wic", "validation"),
    "wsc": ("wsc", "validation"),
    "axb": ("axb", "test"),
    "axg": ("axg", "test"),
}
KIND = {"cola": "mcc", "axb": "mcc", "mrpc": "acc_f1", "qqp": "acc_f1", "cb": "acc_macro_f1"}


@needs_data
@pytest.mark.parametrize("name", sorted(TASK_GOLD))
def test_task_compute_metrics_from_logits(name):
    task = get_task(name)
    source, split = TASK_GOLD[name]
    labels = gold(source)
    dataset = task.load(split, DATA)
    assert list(dataset["label"]) == labels.tolist()  # the loader agrees with the plain reader (label order)
    rng = np.random.default_rng(1)
    for predictions in prediction_sets(labels, task.num_labels)[:4]:
        logits = rng.normal(size=(len(labels), task.num_labels)).astype(np.float32)
        logits[np.arange(len(labels)), predictions] += 10.0
        result = task.compute_metrics(logits, labels)
        expected = reference(KIND.get(name, "accuracy"), predictions, labels)
        assert tuple(result) == task.metric_keys
        assert result == pytest.approx(expected, **TOL)
        assert task.compute_metrics(predictions, None, dataset) == pytest.approx(expected, **TOL)


@needs_data
def test_task_compute_metrics_stsb_and_multirc():
    stsb = get_task("stsb")
    labels = gold("stsb")
    predictions = (labels + np.random.default_rng(2).normal(0, 1, len(labels))).astype(np.float32)[:, None]
    assert stsb.compute_metrics(predictions, labels) == pytest.approx(
        reference("corr", predictions[:, 0], labels), **TOL
    )

    multirc = get_task("multirc")
    dataset = multirc.load("validation", DATA)
    idx, labels = multirc_gold()
    assert list(dataset["idx"]) == idx and list(dataset["label"]) == labels.tolist()
    predictions = perturbed(labels, 0.2, 2, seed=5)
    expected = multirc_reference(idx, predictions, labels)
    assert multirc.compute_metrics(predictions, labels, dataset) == pytest.approx(expected, **TOL)
    assert multirc.compute_metrics(predictions, labels, idx) == pytest.approx(expected, **TOL)  # or the idx list


def test_unknown_metric_config_is_an_error():
    with pytest.raises(KeyError, match="cola"):
        _load("glue", "not_a_task")
    with pytest.raises(KeyError, match="multirc"):
        _load("super_glue", "not_a_task")


def test_every_registered_task_has_a_metric_case():
    covered = {(m, c) for m, c, *_ in CASES} | {("glue", "stsb"), ("super_glue", "multirc"), ("super_glue", "record")}
    assert {(t.benchmark, t.metric) for t in TASKS.values()} <= covered
