"""The GLUE and SuperGLUE tasks, one declarative entry each.

Every entry lists, in this order: benchmark, input fields (HF column names, HF order) and their encoding, label names
in the id order of the HF builders (`nyu-mll/glue`, `super_glue`), problem type, metric config, local files per split
(paths relative to the data folder, with the reader of their format), and the Hub dataset id/config.
Label orders and file formats: `../shared/docs/evaluation-and-data.md` §1 and §5.
"""

from __future__ import annotations

from .readers import FirstExisting, Jsonl, MrpcFromOriginal, MultiRcJsonl, RecordJsonl, Tsv
from .task import MULTIPLE_CHOICE, REGRESSION, SINGLE_LABEL, Task

GLUE_HUB = "nyu-mll/glue"
SUPER_GLUE_HUB = "super_glue"

NLI_3 = ("entailment", "neutral", "contradiction")
NLI_2 = ("entailment", "not_entailment")
BOOL = ("False", "True")

_PAIR = {"sentence1": "sentence1", "sentence2": "sentence2"}
_MRPC = {"sentence1": "#1 String", "sentence2": "#2 String"}
_MNLI_TSV = {"premise": "sentence1", "hypothesis": "sentence2"}
_MNLI_JSONL = {"premise": "premise", "hypothesis": "hypothesis"}
_QQP = {"question1": "question1", "question2": "question2"}
_QNLI = {"question": "question", "sentence": "sentence"}
_WSC = {
    "text": "text",
    "span1_index": "target.span1_index",
    "span2_index": "target.span2_index",
    "span1_text": "target.span1_text",
    "span2_text": "target.span2_text",
}


def _glue_splits(folder: str, fields, label="label", test_fields=None):
    return {
        "train": Tsv(f"glue/{folder}/train.tsv", fields, label),
        "validation": Tsv(f"glue/{folder}/dev.tsv", fields, label),
        "test": Tsv(f"glue/{folder}/test.tsv", test_fields or fields, None),
    }


def _super_glue_splits(folder: str, reader=Jsonl, **kwargs):
    return {split: reader(f"super_glue/{folder}/{name}.jsonl", **kwargs) for split, name in
            (("train", "train"), ("validation", "val"), ("test", "test"))}


def _mnli(kind: str, local_jsonl: bool = False):
    """MNLI dev/test file of `kind` ("dev_matched", ...): the GLUE TSV, or the local 3-key dev_matched JSONL."""
    tsv = Tsv(f"glue/MNLI/{kind}.tsv", _MNLI_TSV, "gold_label" if kind.startswith("dev") else None)
    return FirstExisting(tsv, Jsonl("glue/MNLI/dev.jsonl", _MNLI_JSONL)) if local_jsonl else tsv


_TASK_LIST = [
    # ---------------------------------------------------------------------------------------------- GLUE
    Task(
        name="cola",
        benchmark="glue",
        inputs=("sentence",),
        encoding="text",
        label_names=("unacceptable", "acceptable"),
        problem_type=SINGLE_LABEL,
        metric="cola",
        files={  # train/dev are headerless: source, label, original mark, sentence
            "train": Tsv("glue/CoLA/train.tsv", {"sentence": 3}, 1, header=False),
            "validation": Tsv("glue/CoLA/dev.tsv", {"sentence": 3}, 1, header=False),
            "test": Tsv("glue/CoLA/test.tsv", {"sentence": "sentence"}, None),
        },
        hub=(GLUE_HUB, "cola"),
    ),
    Task(
        name="sst2",
        benchmark="glue",
        inputs=("sentence",),
        encoding="text",
        label_names=("negative", "positive"),
        problem_type=SINGLE_LABEL,
        metric="sst2",
        files=_glue_splits("SST-2", {"sentence": "sentence"}),
        hub=(GLUE_HUB, "sst2"),
    ),
    Task(
        name="mrpc",
        benchmark="glue",
        inputs=("sentence1", "sentence2"),
        encoding="text",
        label_names=("not_equivalent", "equivalent"),
        problem_type=SINGLE_LABEL,
        metric="mrpc",
        files={  # train/dev rebuilt from the MSR files as the HF builder does (glue/MRPC/train.tsv lacks one pair)
            "train": FirstExisting(
                MrpcFromOriginal("train"),
                MrpcFromOriginal("train", "glue/MRPC/msr_paraphrase_train.txt", "glue/MRPC/dev_ids.tsv"),
                Tsv(
                    "glue/MRPC/train.tsv",
                    _MRPC,
                    "Quality",
                    note="MSR source files not found: 3,667 rows, one short of the official 3,668",
                ),
            ),
            "validation": FirstExisting(
                MrpcFromOriginal("validation"),
                MrpcFromOriginal("validation", "glue/MRPC/msr_paraphrase_train.txt", "glue/MRPC/dev_ids.tsv"),
                Tsv("glue/MRPC/dev.tsv", _MRPC, "Quality"),
            ),
            "test": FirstExisting(  # the HF builder reads the labelled MSR test file
                Tsv("glue/MRPC/original/msr_paraphrase_test.txt", _MRPC, "Quality"),
                Tsv("glue/MRPC/msr_paraphrase_test.txt", _MRPC, "Quality"),
                Tsv("glue/MRPC/test.tsv", _MRPC, None),
            ),
        },
        hub=(GLUE_HUB, "mrpc"),
    ),
    Task(
        name="qqp",
        benchmark="glue",
        inputs=("question1", "question2"),
        encoding="text",
        label_names=("not_duplicate", "duplicate"),
        problem_type=SINGLE_LABEL,
        metric="qqp",
        files=_glue_splits("QQP", _QQP, "is_duplicate"),
        hub=(GLUE_HUB, "qqp"),
    ),
    Task(
        name="stsb",
        benchmark="glue",
        inputs=("sentence1", "sentence2"),
        encoding="text",
        label_names=None,
        problem_type=REGRESSION,
        metric="stsb",
        files=_glue_splits("STS-B", _PAIR, "score"),
        hub=(GLUE_HUB, "stsb"),
    ),
    Task(
        name="mnli",
        benchmark="glue",
        inputs=("premise", "hypothesis"),
        encoding="text",
        label_names=NLI_3,
        problem_type=SINGLE_LABEL,
        metric="mnli",
        files={  # local copy: dev_matched only, as glue/MNLI/dev.jsonl
            "train": Tsv("glue/MNLI/train.tsv", _MNLI_TSV, "gold_label"),
            "validation_matched": _mnli("dev_matched", local_jsonl=True),
            "validation_mismatched": _mnli("dev_mismatched"),
            "test_matched": _mnli("test_matched"),
            "test_mismatched": _mnli("test_mismatched"),
        },
        hub=(GLUE_HUB, "mnli"),
    ),
    Task(
        name="qnli",
        benchmark="glue",
        inputs=("question", "sentence"),
        encoding="text",
        label_names=NLI_2,
        problem_type=SINGLE_LABEL,
        metric="qnli",
        files=_glue_splits("QNLI", _QNLI),
        hub=(GLUE_HUB, "qnli"),
    ),
    Task(
        name="rte",
        benchmark="glue",
        inputs=("sentence1", "sentence2"),
        encoding="text",
        label_names=NLI_2,
        problem_type=SINGLE_LABEL,
        metric="rte",
        files=_glue_splits("RTE", _PAIR),
        hub=(GLUE_HUB, "rte"),
    ),
    Task(
        name="wnli",
        benchmark="glue",
        inputs=("sentence1", "sentence2"),
        encoding="text",
        label_names=("not_entailment", "entailment"),  # reversed relative to RTE
        problem_type=SINGLE_LABEL,
        metric="wnli",
        files=_glue_splits("WNLI", _PAIR),
        hub=(GLUE_HUB, "wnli"),
    ),
    # ---------------------------------------------------------------------------------------------- SuperGLUE
    Task(
        name="boolq",
        benchmark="super_glue",
        inputs=("question", "passage"),
        encoding="text",
        label_names=BOOL,
        problem_type=SINGLE_LABEL,
        metric="boolq",
        files=_super_glue_splits("BoolQ"),
        hub=(SUPER_GLUE_HUB, "boolq"),
    ),
    Task(
        name="cb",
        benchmark="super_glue",
        inputs=("premise", "hypothesis"),
        encoding="text",
        label_names=("entailment", "contradiction", "neutral"),
        problem_type=SINGLE_LABEL,
        metric="cb",
        files=_super_glue_splits("CB"),
        hub=(SUPER_GLUE_HUB, "cb"),
    ),
    Task(
        name="copa",
        benchmark="super_glue",
        inputs=("premise", "choice1", "choice2", "question"),
        encoding="copa",
        label_names=("choice1", "choice2"),
        problem_type=MULTIPLE_CHOICE,
        metric="copa",
        files=_super_glue_splits("COPA"),
        hub=(SUPER_GLUE_HUB, "copa"),
    ),
    Task(
        name="multirc",
        benchmark="super_glue",
        inputs=("paragraph", "question", "answer"),
        encoding="multirc",
        label_names=BOOL,
        problem_type=SINGLE_LABEL,
        metric="multirc",
        files=_super_glue_splits("MultiRC", MultiRcJsonl),
        hub=(SUPER_GLUE_HUB, "multirc"),
    ),
    Task(
        name="record",
        benchmark="super_glue",
        inputs=("passage", "query", "entities", "entity_spans", "answers"),
        encoding="record",
        label_names=BOOL,  # the classifier scores each candidate entity: is it a gold answer?
        problem_type=SINGLE_LABEL,
        metric="record",
        files=_super_glue_splits("ReCoRD", RecordJsonl),
        hub=(SUPER_GLUE_HUB, "record"),
    ),
    Task(
        name="superglue_rte",
        benchmark="super_glue",
        inputs=("premise", "hypothesis"),
        encoding="text",
        label_names=NLI_2,
        problem_type=SINGLE_LABEL,
        metric="rte",
        files=_super_glue_splits("RTE"),
        hub=(SUPER_GLUE_HUB, "rte"),
    ),
    Task(
        name="wic",
        benchmark="super_glue",
        inputs=("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2"),
        encoding="wic",
        label_names=BOOL,
        problem_type=SINGLE_LABEL,
        metric="wic",
        files=_super_glue_splits("WiC"),
        hub=(SUPER_GLUE_HUB, "wic"),
    ),
    Task(
        name="wsc",
        benchmark="super_glue",
        inputs=("text", "span1_index", "span2_index", "span1_text", "span2_text"),
        encoding="wsc",
        label_names=BOOL,
        problem_type=SINGLE_LABEL,
        metric="wsc",
        files=_super_glue_splits("WSC", fields=_WSC),
        hub=(SUPER_GLUE_HUB, "wsc"),
    ),
    Task(
        name="axb",
        benchmark="super_glue",
        inputs=("sentence1", "sentence2"),
        encoding="text",
        label_names=NLI_2,
        problem_type=SINGLE_LABEL,
        metric="axb",
        files={"test": Jsonl("super_glue/AX-b/AX-b.jsonl")},  # diagnostic: a labelled test split only
        hub=(SUPER_GLUE_HUB, "axb"),
    ),
    Task(
        name="axg",
        benchmark="super_glue",
        inputs=("premise", "hypothesis"),
        encoding="text",
        label_names=NLI_2,
        problem_type=SINGLE_LABEL,
        metric="axg",
        files={"test": Jsonl("super_glue/AX-g/AX-g.jsonl")},
        hub=(SUPER_GLUE_HUB, "axg"),
    ),
]

TASKS: dict[str, Task] = {task.name: task for task in _TASK_LIST}
GLUE_TASKS = tuple(name for name, task in TASKS.items() if task.benchmark == "glue")
SUPER_GLUE_TASKS = tuple(name for name, task in TASKS.items() if task.benchmark == "super_glue")

_ALIASES = {
    "glue/rte": "rte",
    "super_glue/rte": "superglue_rte",
    "superglue/rte": "superglue_rte",
    "sglue_rte": "superglue_rte",
    "super_glue_rte": "superglue_rte",
    "sst-2": "sst2",
    "sts-b": "stsb",
    "ax-b": "axb",
    "ax-g": "axg",
}


def get_task(name: str | Task) -> Task:
    """The task called `name` (a key of TASKS; also `glue/<task>`, `super_glue/<task>`, `SST-2`-style names)."""
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key.startswith(("glue/", "super_glue/", "superglue/")):
        benchmark, _, short = key.partition("/")
        benchmark = "super_glue" if benchmark == "superglue" else benchmark
        matches = [t for t in TASKS.values() if t.benchmark == benchmark and t.hub[1] == short]
        if matches:
            return matches[0]
    if key in TASKS:
        return TASKS[key]
    raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
