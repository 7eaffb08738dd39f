"""Reproducible train/dev splits for tasks whose local copy lacks a train split (QNLI, BoolQ, MNLI).

`../shared/docs/evaluation-and-data.md` §5: split the dev set with a stratified 80/20 split and a fixed seed, and
write the chosen indices to a file. Label such results "dev-split"; never compare them with official dev numbers.
"""

from __future__ import annotations

import json
import os

import numpy as np


def stratified_split(dataset, fraction: float = 0.2, seed: int = 0, indices_file: str | os.PathLike | None = None):
    """Split `dataset` into `{"train", "validation"}` (a `datasets.DatasetDict`), `fraction` of each label held out.

    Stratified by the `label` column (unstratified for float labels). With `indices_file`: reuse the indices stored
    there if the file exists, else write them (`{"seed", "fraction", "train": [...], "validation": [...]}`)."""
    import datasets

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if indices_file is not None and os.path.isfile(indices_file):
        with open(indices_file) as f:
            chosen = json.load(f)
        train, held_out = chosen["train"], chosen["validation"]
        if max(train + held_out, default=-1) >= len(dataset):
            raise ValueError(f"{indices_file}: indices out of range for a dataset of {len(dataset)} rows")
    else:
        rng = np.random.default_rng(seed)
        labels = np.asarray(list(dataset["label"]))
        groups = (
            [np.arange(len(labels))]
            if labels.dtype.kind == "f"
            else [np.flatnonzero(labels == v) for v in np.unique(labels)]
        )
        held_out_parts = []
        for group in groups:
            group = rng.permutation(group)
            held_out_parts.append(group[: int(round(fraction * len(group)))])
        held = np.sort(np.concatenate(held_out_parts)) if held_out_parts else np.array([], dtype=np.int64)
        mask = np.ones(len(labels), dtype=bool)
        mask[held] = False
        train, held_out = np.flatnonzero(mask).tolist(), held.tolist()
        if indices_file is not None:
            os.makedirs(os.path.dirname(os.path.abspath(indices_file)), exist_ok=True)
            with open(indices_file, "w") as f:
                json.dump({"seed": seed, "fraction": fraction, "train": train, "validation": held_out}, f)
    return datasets.DatasetDict({"train": dataset.select(train), "validation": dataset.select(held_out)})
