"""Turning a batch of task examples into model inputs (for `Dataset.map(batched=True)`).

Every encoding returns the tokenizer's outputs (`input_ids`, `attention_mask`, and `token_type_ids` when the
tokenizer produces them), unpadded (pad per batch with `DataCollatorWithPadding`, or `DataCollatorForMultipleChoice`
for COPA), plus `labels`:
- `text`: one or two text fields, as a single text or a tokenizer pair (truncation `longest_first`);
- `copa`: multiple choice; per example 2 pairs (premise, "because"/"so" + choice) for question cause/effect, padded
  to a common length so each column holds a [num_choices, seq] list per example (for a `...ForMultipleChoice` head);
- `wic`: the pair (sentence1, sentence2) with the target word marked `*word*` in both, via the char offsets;
- `wsc`: the text with span1 (the candidate referent) marked `[span1]` and span2 (the pronoun) marked `*span2*`;
- `multirc`: the pair (paragraph, question + " " + answer), one row per answer;
- `record`: one row per (query, candidate entity): the pair (passage, query with `@placeholder` replaced by the
  entity), label 1 if the entity is a gold answer. The output has more rows than the input, so map with
  `remove_columns=dataset.column_names` (`Task.encode` does).

Labels: class ids for classification (an unlabelled example, label -1, becomes -100 so the loss ignores it),
float32 scores for regression (STS-B).

Decoder tokenizers: a tokenizer without a pad token gets `pad_token = eos_token` (the tokenizer object is updated,
so a collator built from it pads with eos; set the model's `config.pad_token_id` to the same id). When a tokenizer
puts nothing between the two texts of a pair (GPT-2/SmolLM2-style BPE), the second text starts with a newline so the
two segments stay apart.
"""

from __future__ import annotations

import re

import numpy as np

IGNORE_INDEX = -100
SECOND_SEGMENT_PREFIX = "\n"  # only for tokenizers that add no separator between the texts of a pair
COPA_CONNECTIVES = {"cause": "because", "effect": "so"}


def ensure_pad_token(tokenizer):
    """Set `pad_token = eos_token` on a tokenizer without a pad token; return the tokenizer."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has neither a pad token nor an eos token to pad with; "
                "set tokenizer.pad_token first"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _separates_pairs(tokenizer) -> bool:
    try:
        return tokenizer.num_special_tokens_to_add(pair=True) > tokenizer.num_special_tokens_to_add(pair=False)
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return True


def tokenize(tokenizer, first, second=None, max_length=128) -> dict:
    """Tokenize single texts or pairs (truncated to `max_length`, unpadded); plain lists per key."""
    if second is None:
        encoded = tokenizer(list(first), truncation=True, max_length=max_length)
    else:
        second = list(second)
        if not _separates_pairs(tokenizer):
            second = [SECOND_SEGMENT_PREFIX + text for text in second]
        encoded = tokenizer(list(first), second, truncation="longest_first", max_length=max_length)
    return {key: list(values) for key, values in encoded.items()}


def class_labels(labels) -> list[int]:
    return [int(label) if label is not None and int(label) >= 0 else IGNORE_INDEX for label in labels]


def regression_labels(labels) -> np.ndarray:
    return np.asarray(labels, dtype=np.float32)


# -- span marking ----------------------------------------------------------------------------------------------------


def mark_char_span(text: str, start: int, end: int, left: str = "*", right: str = "*") -> str:
    """`text` with `left`/`right` inserted around text[start:end]."""
    start, end = max(0, min(start, len(text))), max(0, min(end, len(text)))
    return text[:start] + left + text[start:end] + right + text[end:]


def wsc_char_span(text: str, span_text: str, word_index: int) -> tuple[int, int]:
    """Character span of a WSC span given as (text, index of its first word in `text.split()`).

    The occurrence of `span_text` (whole words, case-insensitive, any whitespace; a final "." may be missing) nearest
    to the indexed word wins; where the span text does not occur (2 test examples), the words at the index are used."""
    words = list(re.finditer(r"\S+", text))
    if not words:
        return 0, 0
    word_index = max(0, min(word_index, len(words) - 1))
    anchor = words[word_index].start()
    n_words = max(len(span_text.split()), 1)
    for candidate in dict.fromkeys((span_text, span_text.rstrip("."))):  # some spans carry a stray final "."
        pieces = [re.escape(piece) for piece in candidate.split()]
        if not pieces:
            continue
        pattern = re.compile(r"(?<!\w)" + r"\s+".join(pieces) + r"(?!\w)", re.IGNORECASE)
        matches = list(pattern.finditer(text))
        if matches:
            best = min(matches, key=lambda m: abs(m.start() - anchor))
            return best.start(), best.end()
    last = words[min(word_index + n_words - 1, len(words) - 1)]
    return anchor, last.end()


def mark_wsc(text: str, span1_text: str, span1_index: int, span2_text: str, span2_index: int) -> str:
    """The WSC text with span1 as `[span1]` and span2 as `*span2*`."""
    start1, end1 = wsc_char_span(text, span1_text, span1_index)
    start2, end2 = wsc_char_span(text, span2_text, span2_index)
    events = [(start1, 1, "["), (end1, 0, "]"), (start2, 1, "*"), (end2, 0, "*")]  # closers before openers
    pieces, previous = [], 0
    for position, _, marker in sorted(events):
        pieces += [text[previous:position], marker]
        previous = position
    return "".join(pieces) + text[previous:]


def copa_continuation(question: str, choice: str) -> str:
    if question not in COPA_CONNECTIVES:
        raise ValueError(f"COPA question must be one of {sorted(COPA_CONNECTIVES)}, got {question!r}")
    first_word = choice.split(" ", 1)[0]
    if choice and not (
        first_word == "I" or first_word.startswith("I'") or first_word.isupper() and len(first_word) > 1
    ):
        choice = choice[0].lower() + choice[1:]
    return f"{COPA_CONNECTIVES[question]} {choice}"


def record_passage(passage: str) -> str:
    return re.sub(r"\s*@highlight\s*", " - ", passage).strip(" -") if "@highlight" in passage else passage


def record_candidates(batch) -> list[tuple[int, str]]:
    """(example position in the batch, entity) for every candidate, in order: the expansion used by `record`."""
    return [(i, entity) for i, entities in enumerate(batch["entities"]) for entity in entities]


# -- encodings -------------------------------------------------------------------------------------------------------


def encode_text(task, tokenizer, batch, max_length):
    fields = task.inputs
    first = batch[fields[0]]
    second = batch[fields[1]] if len(fields) > 1 else None
    out = tokenize(tokenizer, first, second, max_length)
    out["labels"] = regression_labels(batch["label"]) if task.is_regression else class_labels(batch["label"])
    return out


def encode_wic(task, tokenizer, batch, max_length):
    first = [mark_char_span(s, a, b) for s, a, b in zip(batch["sentence1"], batch["start1"], batch["end1"])]
    second = [mark_char_span(s, a, b) for s, a, b in zip(batch["sentence2"], batch["start2"], batch["end2"])]
    out = tokenize(tokenizer, first, second, max_length)
    out["labels"] = class_labels(batch["label"])
    return out


def encode_wsc(task, tokenizer, batch, max_length):
    texts = [
        mark_wsc(*row)
        for row in zip(
            batch["text"], batch["span1_text"], batch["span1_index"], batch["span2_text"], batch["span2_index"]
        )
    ]
    out = tokenize(tokenizer, texts, None, max_length)
    out["labels"] = class_labels(batch["label"])
    return out


def encode_multirc(task, tokenizer, batch, max_length):
    second = [f"{question} {answer}" for question, answer in zip(batch["question"], batch["answer"])]
    out = tokenize(tokenizer, batch["paragraph"], second, max_length)
    out["labels"] = class_labels(batch["label"])
    return out


def encode_copa(task, tokenizer, batch, max_length):
    choices = ("choice1", "choice2")
    first, second = [], []
    for i, premise in enumerate(batch["premise"]):
        for choice in choices:
            first.append(premise)
            second.append(copa_continuation(batch["question"][i], batch[choice][i]))
    flat = tokenize(tokenizer, first, second, max_length)
    n = len(choices)
    out = {key: [] for key in flat}
    for i in range(len(batch["premise"])):
        group = {key: values[i * n : (i + 1) * n] for key, values in flat.items()}
        padded = tokenizer.pad(group, padding="longest")
        for key in flat:
            out[key].append([list(row) for row in padded[key]])
    out["labels"] = class_labels(batch["label"])
    return out


def encode_record(task, tokenizer, batch, max_length):
    candidates = record_candidates(batch)
    passages = {i: record_passage(batch["passage"][i]) for i in {i for i, _ in candidates}}
    first = [passages[i] for i, _ in candidates]
    second = [batch["query"][i].replace("@placeholder", entity) for i, entity in candidates]
    out = tokenize(tokenizer, first, second, max_length) if candidates else {"input_ids": [], "attention_mask": []}
    labels = []
    for i, entity in candidates:
        answers = batch["answers"][i]
        labels.append(int(entity in answers) if answers else IGNORE_INDEX)
    out["labels"] = labels
    return out


ENCODINGS = {
    "text": encode_text,
    "wic": encode_wic,
    "wsc": encode_wsc,
    "multirc": encode_multirc,
    "copa": encode_copa,
    "record": encode_record,
}


class Preprocessor:
    """The callable returned by `Task.preprocess`: `fn(batch) -> model inputs` for `Dataset.map(batched=True)`."""

    def __init__(self, task, tokenizer, max_length: int = 128):
        if task.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {task.encoding!r}; valid: {sorted(ENCODINGS)}")
        self.task = task
        self.tokenizer = ensure_pad_token(tokenizer)
        self.max_length = int(max_length)

    def __call__(self, batch):
        return ENCODINGS[self.task.encoding](self.task, self.tokenizer, batch, self.max_length)

    def __repr__(self):
        return (
            f"Preprocessor(task={self.task.name!r}, tokenizer={type(self.tokenizer).__name__}, "
            f"max_length={self.max_length})"
        )
