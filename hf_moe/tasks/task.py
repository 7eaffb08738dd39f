"""`Task`: one GLUE/SuperGLUE task: its data (Hub or local files), its preprocessing and its official metric."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metrics import METRIC_KEYS, load_metric
from .preprocessing import Preprocessor, record_candidates
from .readers import FirstExisting

logger = logging.getLogger(__name__)

SINGLE_LABEL = "single_label_classification"
REGRESSION = "regression"
MULTIPLE_CHOICE = "multiple_choice"
PROBLEM_TYPES = (SINGLE_LABEL, REGRESSION, MULTIPLE_CHOICE)
BENCHMARKS = ("glue", "super_glue")
DATA_DIR_ENV = "HF_MOE_DATA_DIR"

SPLIT_ALIASES = {
    "dev": "validation",
    "val": "validation",
    "valid": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}

# HF feature types of the non-text input columns
_INT_INPUTS = ("start1", "start2", "end1", "end2", "span1_index", "span2_index")


def _input_feature(name: str):
    import datasets

    if name in _INT_INPUTS:
        return datasets.Value("int32")
    if name in ("entities", "answers"):
        return datasets.Sequence(datasets.Value("string"))
    if name == "entity_spans":
        return datasets.Sequence(
            {"text": datasets.Value("string"), "start": datasets.Value("int32"), "end": datasets.Value("int32")}
        )
    return datasets.Value("string")


def _as_array(values) -> np.ndarray:
    """Model outputs / labels as a numpy array; a tuple of arrays (logits plus extra outputs) gives its first one."""
    if isinstance(values, tuple) and values and np.ndim(values[0]) >= 1:
        values = values[0]
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu()
        values = (values.float() if values.is_floating_point() else values).numpy()
    return np.asarray(values)


def _column(dataset, name: str) -> list:
    if hasattr(dataset, "column_names"):
        if name not in dataset.column_names:
            raise ValueError(
                f"the dataset has no {name!r} column (columns: {dataset.column_names}); "
                "pass the raw split from Task.load"
            )
        return list(dataset[name])
    return [row[name] for row in dataset]


def _idx_list(dataset) -> list:
    """The `idx` values of a dataset (a `datasets.Dataset`, a list of rows, or the list of idx values itself)."""
    if dataset is None:
        raise ValueError(
            "this task's metric groups answers by `idx`: pass dataset= (the evaluated split) or the idx list"
        )
    if hasattr(dataset, "column_names"):
        return _column(dataset, "idx")
    rows = list(dataset)
    if rows and isinstance(rows[0], Mapping) and "idx" in rows[0]:
        return [row["idx"] for row in rows]
    return rows


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (`files` is a dict)
class Task:
    """A GLUE/SuperGLUE task (see `hf_moe.tasks.TASKS`).

    name: registry key; benchmark: "glue" or "super_glue" (also the metric module); inputs: the input columns of the
    HF dataset, in HF order; encoding: how `preprocess` turns them into model inputs (see `preprocessing`);
    label_names: class names in the id order of the HF builders (None for regression); problem_type:
    "single_label_classification", "regression" or "multiple_choice"; metric: config of the metric module;
    files: split -> reader of the local file(s), paths relative to the data folder (the one holding `glue/` and
    `super_glue/`); hub: (dataset id, config) for `datasets.load_dataset`.
    """

    name: str
    benchmark: str
    inputs: tuple[str, ...]
    encoding: str
    label_names: tuple[str, ...] | None
    problem_type: str
    metric: str
    files: Mapping[str, Any]
    hub: tuple[str, str]

    def __post_init__(self):
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"{self.name}: benchmark must be one of {BENCHMARKS}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"{self.name}: problem_type must be one of {PROBLEM_TYPES}")
        if (self.label_names is None) != (self.problem_type == REGRESSION):
            raise ValueError(f"{self.name}: label_names must be None exactly for regression")
        if (self.benchmark, self.metric) not in METRIC_KEYS:
            raise ValueError(f"{self.name}: no metric {self.benchmark}/{self.metric}")

    # -- description -------------------------------------------------------------------------------------------------

    @property
    def is_regression(self) -> bool:
        return self.problem_type == REGRESSION

    @property
    def num_labels(self) -> int:
        """Outputs of the classification head: 1 for regression, else the number of classes (choices for COPA)."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def num_choices(self) -> int | None:
        return len(self.label_names) if self.problem_type == MULTIPLE_CHOICE else None

    @property
    def id2label(self) -> dict[int, str]:
        return {0: "score"} if self.label_names is None else dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Keys of `compute_metrics`' result, main metric first."""
        return METRIC_KEYS[(self.benchmark, self.metric)]

    @property
    def main_metric(self) -> str:
        return self.metric_keys[0]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """The labelled evaluation splits (dev sets; the diagnostics' test split)."""
        found = tuple(s for s in self.files if s.startswith("validation"))
        return found or ("test",)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {self.benchmark}, labels={self.label_names}, metric={self.metric_keys})"

    # -- data --------------------------------------------------------------------------------------------------------

    def resolve_split(self, split: str) -> str:
        key = SPLIT_ALIASES.get(split, split)
        if key not in self.files:
            raise ValueError(f"task {self.name!r} has no split {split!r}; valid splits: {list(self.files)}")
        return key

    def load(self, split: str, data_dir: str | os.PathLike | None = None):
        """The split as a `datasets.Dataset` with the HF dataset's columns (`label` as class ids, `idx`).

        data_dir: the folder holding `glue/` and `super_glue/` in the official layout (default: `$HF_MOE_DATA_DIR`;
        if neither is set, `datasets.load_dataset(*self.hub, split=split)`). A missing file raises
        FileNotFoundError naming the expected path; a label outside the label set raises ValueError naming the file
        and line. Unlabelled examples (test splits) have label -1.
        """
        split = self.resolve_split(split)
        if data_dir is None:
            data_dir = os.environ.get(DATA_DIR_ENV) or None
        if data_dir is None:
            return self._load_hub(split)
        return self._load_local(split, os.fspath(data_dir))

    def _load_hub(self, split: str):
        import datasets

        path, config = self.hub
        try:
            return datasets.load_dataset(path, config, split=split)
        except Exception as error:
            if hasattr(error, "add_note"):
                error.add_note(
                    f"hf_moe: loading {path}/{config} from the Hub failed; to read local files in the official "
                    f"GLUE/SuperGLUE layout pass data_dir= or set ${DATA_DIR_ENV}"
                )
            raise

    def _load_local(self, split: str, root: str):
        import datasets

        reader = self.files[split]
        what = f"task {self.name!r}, split {split!r}"
        if isinstance(reader, FirstExisting):
            reader = reader.choose(root, what)
        examples = reader.read(root, self._label_id, what, self.inputs)
        features = self.features()
        columns = {name: [example[name] for example in examples] for name in features}
        return datasets.Dataset.from_dict(columns, features=features)

    def features(self):
        """The `datasets.Features` of a loaded split (the HF dataset's, in its column order)."""
        import datasets

        features = {name: _input_feature(name) for name in self.inputs}
        if self.encoding == "multirc":
            idx = {k: datasets.Value("int32") for k in ("paragraph", "question", "answer")}
        elif self.encoding == "record":
            idx = {k: datasets.Value("int32") for k in ("passage", "query")}
        else:
            idx = datasets.Value("int32")
        label = datasets.Value("float32") if self.is_regression else datasets.ClassLabel(names=list(self.label_names))
        if self.encoding == "record":  # no label column: `answers` (an input) holds the gold answers
            features["idx"] = idx
        elif self.benchmark == "glue":
            features["label"], features["idx"] = label, idx
        else:
            features["idx"], features["label"] = idx, label
        return datasets.Features(features)

    def _label_id(self, raw, path: str, line: int):
        """A raw label from a file -> its id (-1 if absent); ValueError naming the file and line if not in the set."""
        if raw is None:
            return -1.0 if self.is_regression else -1

        def bad():
            if self.is_regression:
                expected = "a float score"
            else:
                expected = f"one of {list(self.label_names)} (or ids 0..{self.num_labels - 1})"
            return ValueError(
                f"{path}, line {line}: label {raw!r} is not in the label set of task {self.name!r}: expected {expected}"
            )

        if self.is_regression:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise bad() from None
            if not math.isfinite(value):
                raise bad()
            return value
        if isinstance(raw, bool):
            value = int(raw)
        elif isinstance(raw, int):
            value = raw
        elif isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        elif isinstance(raw, str):
            text = raw.strip()
            by_name = {name.lower(): i for i, name in enumerate(self.label_names)}
            if text.lower() in by_name:
                return by_name[text.lower()]
            if not text.lstrip("-").isdigit():
                raise bad()
            value = int(text)
        else:
            raise bad()
        if not 0 <= value < self.num_labels:
            raise bad()
        return value

    # -- model inputs ------------------------------------------------------------------------------------------------

    def preprocess(self, tokenizer, max_length: int = 128):
        """A callable for `dataset.map(fn, batched=True)` giving model inputs and `labels` (see `preprocessing`).

        Sets `tokenizer.pad_token = tokenizer.eos_token` if the tokenizer has no pad token. For ReCoRD the output
        has one row per candidate entity, so map with `remove_columns=dataset.column_names` (or use `encode`)."""
        return Preprocessor(self, tokenizer, max_length)

    def encode(self, dataset, tokenizer, max_length: int = 128, **map_kwargs):
        """`dataset.map(self.preprocess(tokenizer, max_length), batched=True, remove_columns=<all>)`."""
        map_kwargs.setdefault("remove_columns", dataset.column_names)
        return dataset.map(self.preprocess(tokenizer, max_length), batched=True, **map_kwargs)

    # -- metrics -----------------------------------------------------------------------------------------------------

    def predicted_labels(self, predictions) -> np.ndarray:
        """Class ids (argmax over logits [N, C], or ids as given) or, for regression, scores of shape [N]."""
        values = _as_array(predictions)
        if self.is_regression:
            if values.ndim == 2 and values.shape[1] == 1:
                values = values[:, 0]
            if values.ndim != 1:
                raise ValueError(
                    f"{self.name}: regression predictions must have shape [N] or [N, 1], got {values.shape}"
                )
            return values.astype(np.float64)
        if values.ndim == 2:
            if values.shape[1] != self.num_labels:
                raise ValueError(
                    f"{self.name}: logits have {values.shape[1]} columns, the task has {self.num_labels} labels"
                )
            return values.argmax(axis=-1).astype(np.int64)
        if values.ndim != 1:
            raise ValueError(
                f"{self.name}: predictions must be ids [N] or logits [N, {self.num_labels}], got shape {values.shape}"
            )
        if values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0):
            raise ValueError(f"{self.name}: 1-D predictions must be class ids; got non-integer values")
        return values.astype(np.int64)

    def _references(self, references, dataset, n: int) -> np.ndarray:
        if references is None:
            if dataset is None:
                raise ValueError("pass references= or dataset= (with a `label` column)")
            references = _column(dataset, "label")
        values = _as_array(references)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        values = values.astype(np.float64 if self.is_regression else np.int64)
        if values.shape != (n,):
            raise ValueError(f"{self.name}: {n} predictions but references of shape {values.shape}")
        if not self.is_regression and np.any(values < 0):
            raise ValueError(f"{self.name}: references contain unlabelled examples (label < 0), e.g. a test split")
        return values

    def compute_metrics(self, predictions, references=None, dataset=None) -> dict[str, float]:
        """The official metric of the task: a dict with `metric_keys`.

        predictions: class ids, logits [N, C] (argmax taken), or regression scores; for COPA, logits
        [N, num_choices]. references: label ids/scores (default: `dataset["label"]`). dataset (or the list of
        `idx` values): needed for MultiRC (answers grouped by question). ReCoRD: predictions are either one answer
        text per query or one score per candidate entity in `preprocess`' order ([M], [M, 1] or logits [M, 2]);
        references are lists of gold answers (default: `dataset["answers"]`); dataset gives `idx`/`entities`."""
        metric = load_metric(self.benchmark, self.metric)
        if self.encoding == "record":
            result = self._record_metric(metric, predictions, references, dataset)
        else:
            predicted = self.predicted_labels(predictions)
            gold = self._references(references, dataset, len(predicted))
            if self.encoding == "multirc":
                idx = _idx_list(dataset)
                if len(idx) != len(predicted):
                    raise ValueError(f"{self.name}: {len(predicted)} predictions but {len(idx)} idx entries")
                predicted = [{"idx": dict(i), "prediction": int(p)} for i, p in zip(idx, predicted)]
            result = metric.compute(predictions=predicted, references=gold)
        return {key: float(result[key]) for key in self.metric_keys}

    def _record_metric(self, metric, predictions, references, dataset):
        if references is None:
            if dataset is None:
                raise ValueError("record: pass references= (gold answer lists) or dataset= (with `answers`)")
            references = _column(dataset, "answers")
        references = [list(answers) for answers in references]
        idx = (
            _idx_list(dataset) if dataset is not None else [{"passage": 0, "query": i} for i in range(len(references))]
        )
        if len(idx) != len(references):
            raise ValueError(f"record: {len(references)} references but {len(idx)} idx entries")
        if isinstance(predictions, (list, tuple)) and predictions and all(isinstance(p, str) for p in predictions):
            texts = list(predictions)
        else:
            texts = self._record_best_entities(predictions, dataset)
        if len(texts) != len(references):
            raise ValueError(f"record: {len(texts)} predictions for {len(references)} queries")
        return metric.compute(
            predictions=[{"idx": dict(i), "prediction_text": t} for i, t in zip(idx, texts)],
            references=[{"idx": dict(i), "answers": a} for i, a in zip(idx, references)],
        )

    def _record_best_entities(self, scores, dataset) -> list[str]:
        """Per query, the candidate entity with the highest score (scores in `preprocess`' candidate order)."""
        if dataset is None:
            raise ValueError("record: per-candidate scores need dataset= (the raw split, for its entities)")
        values = _as_array(scores).astype(np.float64)
        if values.ndim == 2 and values.shape[1] == 2:
            values = values[:, 1] - values[:, 0]
        elif values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        entities = _column(dataset, "entities")
        candidates = record_candidates({"entities": entities})
        if values.shape != (len(candidates),):
            raise ValueError(f"record: {values.shape} scores for {len(candidates)} candidate entities")
        best: dict[int, tuple[float, str]] = {}
        for (i, entity), score in zip(candidates, values):
            if i not in best or score > best[i][0]:
                best[i] = (score, entity)
        return [best[i][1] if i in best else "" for i in range(len(entities))]

    def compute_metrics_fn(self, dataset=None):
        """A `Trainer`-style `compute_metrics(EvalPrediction) -> dict` for this task.

        dataset: the raw evaluated split (from `load`), required for MultiRC (idx) and ReCoRD (entities, answers);
        its row order must match the evaluated (tokenized) dataset."""
        if self.encoding in ("multirc", "record") and dataset is None:
            raise ValueError(f"{self.name}: compute_metrics_fn needs dataset= (the raw evaluated split)")

        def compute_metrics(eval_prediction) -> dict[str, float]:
            predictions = eval_prediction.predictions
            if self.encoding == "record":
                return self.compute_metrics(predictions, None, dataset)
            labels = getattr(eval_prediction, "label_ids", None)
            if isinstance(labels, tuple):
                labels = labels[0] if labels else None
            return self.compute_metrics(predictions, labels, dataset)

        compute_metrics.__name__ = f"compute_metrics_{self.name}"
        return compute_metrics
