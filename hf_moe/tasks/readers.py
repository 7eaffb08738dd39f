"""Readers for the local GLUE/SuperGLUE files (the official distribution layout, as in `../shared/data`).

Each reader is a small frozen description of one file format. `read(root, label_id)` returns one dict per example
with the columns of the Hugging Face dataset (`nyu-mll/glue`, `super_glue`): the text fields, `idx`, and `label`
already turned into an id by `label_id(raw, path, line)` (which raises `ValueError` naming the file and line for a
label outside the task's label set). A missing file raises `FileNotFoundError` naming the path that was expected.

Reading rules (`../shared/docs/evaluation-and-data.md` §5): GLUE TSVs are read with `csv.QUOTE_NONE` (MRPC, QNLI
and STS-B contain unbalanced `"`) and `utf-8-sig` (MRPC starts with a BOM); CoLA train/dev have no header; SuperGLUE
JSONL labels are JSON booleans, strings or ints; MultiRC is flattened to one row per answer with
`idx = {paragraph, question, answer}`; WSC's `target` is flattened to its span fields.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

LabelId = Callable[[object, str, int], "int | float"]  # (raw label, path, line) -> id; -1 for "no label"
UNLABELLED = None  # the raw label of an example without one (test splits)

__all__ = ["Tsv", "Jsonl", "MrpcFromOriginal", "MultiRcJsonl", "RecordJsonl", "FirstExisting", "missing_file_error"]


def missing_file_error(paths, what: str) -> FileNotFoundError:
    paths = [str(p) for p in paths]
    listed = paths[0] if len(paths) == 1 else " or ".join(paths)
    return FileNotFoundError(f"{what}: expected the file {listed}, which does not exist")


def _require(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise missing_file_error([path], what)


def _tsv_rows(path: str):
    """(line number, row) for each row of a GLUE TSV: QUOTE_NONE, utf-8-sig, blank lines skipped."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            if row:
                yield reader.line_num, row


def _jsonl_rows(path: str):
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error})") from None


def _lookup(row: Mapping, key: str):
    """`row[key]`, where `key` may be a dotted path into nested objects (`target.span1_index`)."""
    value = row
    for part in key.split("."):
        value = value[part]
    return value


@dataclass(frozen=True)
class Tsv:
    """A GLUE TSV. `fields` maps each output column to a header name (or a 0-based column index if `header=False`);
    `label` is the label column (absent in test files: then every label is -1). `idx` is the row number, as in the
    HF GLUE builder. Rows shorter than the header are skipped with a warning (the HF builder drops them too)."""

    path: str
    fields: Mapping[str, str | int]
    label: str | int | None = "label"
    header: bool = True
    note: str | None = None  # logged when this file is used (e.g. a fallback with a known defect)

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def read(self, root: str, label_id: LabelId, what: str, input_fields=()) -> list[dict]:
        path = os.path.join(root, self.path)
        _require(path, what)
        if self.note:
            logger.warning("%s: %s", path, self.note)
        rows = _tsv_rows(path)
        if self.header:
            try:
                _, names = next(rows)
            except StopIteration:
                raise ValueError(f"{path}: empty file, expected a header row") from None
            positions = {name: i for i, name in enumerate(names)}
            missing = [c for c in self.fields.values() if c not in positions]
            if missing:
                raise ValueError(f"{path}: header {names} lacks the column(s) {missing}")
            columns = {out: positions[c] for out, c in self.fields.items()}
            label_column = positions.get(self.label) if self.label is not None else None
            width = len(names)
        else:
            columns = dict(self.fields)
            label_column = self.label
            width = max([*columns.values(), -1 if label_column is None else label_column]) + 1
        examples, short = [], []
        for n, (line, row) in enumerate(rows):
            if len(row) < width:
                short.append(line)
                continue
            example = {out: row[i] for out, i in columns.items()}
            raw = row[label_column] if label_column is not None else UNLABELLED
            example["label"] = label_id(raw, path, line)
            example["idx"] = n
            examples.append(example)
        if short:
            logger.warning(
                "%s: skipped %d row(s) with fewer than %d columns (lines %s)", path, len(short), width, short[:10]
            )
        return examples


@dataclass(frozen=True)
class MrpcFromOriginal:
    """MRPC train/validation rebuilt from the MSR source file and the GLUE dev ids, as the HF builder does: `train` =
    every row of `msr_paraphrase_train.txt` whose (#1 ID, #2 ID) pair is not in `dev_ids.tsv` (3,668 rows),
    `validation` = the others (408 rows); `idx` = the row number in the source file."""

    part: str  # "train" or "validation"
    source: str = "glue/MRPC/original/msr_paraphrase_train.txt"
    dev_ids: str = "glue/MRPC/original/dev_ids.tsv"
    note: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.source, self.dev_ids)

    def read(self, root: str, label_id: LabelId, what: str, input_fields=()) -> list[dict]:
        source, dev_ids_path = os.path.join(root, self.source), os.path.join(root, self.dev_ids)
        _require(source, what)
        _require(dev_ids_path, what)
        dev_ids = {(row[0], row[1]) for _, row in _tsv_rows(dev_ids_path)}
        rows = _tsv_rows(source)
        _, names = next(rows)
        at = {name: i for i, name in enumerate(names)}
        examples = []
        for n, (line, row) in enumerate(rows):
            in_dev = (row[at["#1 ID"]], row[at["#2 ID"]]) in dev_ids
            if in_dev == (self.part == "validation"):
                examples.append(
                    {
                        "sentence1": row[at["#1 String"]],
                        "sentence2": row[at["#2 String"]],
                        "label": label_id(row[at["Quality"]], source, line),
                        "idx": n,
                    }
                )
        return examples


@dataclass(frozen=True)
class Jsonl:
    """A SuperGLUE-style JSONL file, one example per line. `fields` maps output columns to keys (dotted paths reach
    into nested objects, e.g. WSC's `target.span1_index`); None = the task's input fields under their own names.
    `idx` is the file's `idx` (as an int), or the row number where the file has none (MNLI's dev.jsonl)."""

    path: str
    fields: Mapping[str, str] | None = None
    label: str = "label"
    note: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def read(self, root: str, label_id: LabelId, what: str, input_fields=()) -> list[dict]:
        path = os.path.join(root, self.path)
        _require(path, what)
        fields = self.fields if self.fields is not None else {name: name for name in input_fields}
        examples = []
        for n, (line, row) in enumerate(_jsonl_rows(path)):
            try:
                example = {out: _lookup(row, key) for out, key in fields.items()}
            except (KeyError, TypeError) as error:
                raise ValueError(f"{path}, line {line}: missing field {error}") from None
            example["idx"] = int(row["idx"]) if "idx" in row else n
            example["label"] = label_id(row.get(self.label, UNLABELLED), path, line)
            examples.append(example)
        return examples


@dataclass(frozen=True)
class MultiRcJsonl:
    """MultiRC: `passage.questions[].answers[]` flattened to one row per answer (HF `super_glue/multirc` layout)."""

    path: str

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def read(self, root: str, label_id: LabelId, what: str, input_fields=()) -> list[dict]:
        path = os.path.join(root, self.path)
        _require(path, what)
        examples = []
        for line, row in _jsonl_rows(path):
            try:
                passage = row["passage"]
                for question in passage["questions"]:
                    for answer in question["answers"]:
                        examples.append(
                            {
                                "paragraph": passage["text"],
                                "question": question["question"],
                                "answer": answer["text"],
                                "idx": {
                                    "paragraph": int(row["idx"]),
                                    "question": int(question["idx"]),
                                    "answer": int(answer["idx"]),
                                },
                                "label": label_id(answer.get("label", UNLABELLED), path, line),
                            }
                        )
            except (KeyError, TypeError) as error:
                raise ValueError(f"{path}, line {line}: missing field {error}") from None
        return examples


@dataclass(frozen=True)
class RecordJsonl:
    """ReCoRD (official SuperGLUE JSONL): one row per query with the passage's entities (unique texts, sorted), the
    entity spans (sorted by start, end exclusive) and the unique answer texts (sorted), as HF `super_glue/record`."""

    path: str

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def read(self, root: str, label_id: LabelId, what: str, input_fields=()) -> list[dict]:
        path = os.path.join(root, self.path)
        _require(path, what)
        examples = []
        for line, row in _jsonl_rows(path):
            try:
                passage = row["passage"]
                text = passage["text"]
                spans = sorted(
                    (
                        {"text": text[e["start"] : e["end"] + 1], "start": e["start"], "end": e["end"] + 1}
                        for e in passage["entities"]
                    ),
                    key=lambda span: span["start"],
                )
                entities = sorted({span["text"] for span in spans})
                for qa in row["qas"]:
                    answers = sorted({answer["text"] for answer in qa.get("answers", [])})
                    examples.append(
                        {
                            "passage": text,
                            "query": qa["query"],
                            "entities": entities,
                            "entity_spans": {key: [span[key] for span in spans] for key in ("text", "start", "end")},
                            "answers": answers,
                            "idx": {"passage": int(row["idx"]), "query": int(qa["idx"])},
                        }
                    )
            except (KeyError, TypeError) as error:
                raise ValueError(f"{path}, line {line}: missing field {error}") from None
        return examples


class FirstExisting:
    """The first of several readers whose files all exist (the official layout first, then local variants)."""

    def __init__(self, *options):
        self.options = tuple(options)

    def __repr__(self):
        return f"FirstExisting{self.options!r}"

    @property
    def paths(self) -> tuple[str, ...]:
        return self.options[0].paths

    def choose(self, root: str, what: str):
        for option in self.options:
            if all(os.path.isfile(os.path.join(root, p)) for p in option.paths):
                return option
        expected = [" + ".join(os.path.join(root, p) for p in option.paths) for option in self.options]
        raise missing_file_error(expected, what)
