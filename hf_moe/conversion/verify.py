"""Check a conversion: run the source and the result on the same sample inputs and measure how far apart they are
(docs/upcycling.md §6)."""

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from ..modeling import HEADS
from .structure import head_of

logger = logging.getLogger(__name__)

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route every token to a few experts.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A short one.",
]


@torch.no_grad()
def compare_outputs(source_model, converted_model, tokenizer=None, seed: int = 0) -> dict:
    """For every floating output of the source's head (logits, start/end logits, hidden states, ...): max |delta| and
    relative error of the converted model's, and, for logits, the mean KL(source || converted) over real tokens."""
    inputs = _sample_inputs(source_model, tokenizer, seed)
    source, converted = (model.eval()(**inputs) for model in (source_model, converted_model))
    report = {}
    for name, value in source.items():
        if not (torch.is_tensor(value) and value.is_floating_point()):
            continue  # caches, tuples of per-layer states (not requested)
        reference, result = value.float(), converted[name].float()
        figures = {
            "max_abs_diff": (result - reference).abs().max().item(),
            "relative_error": ((result - reference).norm() / reference.norm()).item(),
        }
        if name.endswith("logits") and reference.shape[-1] > 1:  # a distribution (not regression, one label)
            kl = torch.nn.functional.kl_div(
                result.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none"
            ).sum(-1)
            mask = inputs["attention_mask"].bool()
            figures["kl"] = kl[mask].mean().item() if kl.shape == mask.shape else kl.mean().item()
        report[name] = figures
    return {"outputs": report}


def verify_conversion(folder: Path, converted: Path, gguf_file: str | None = None) -> dict:
    """Compare the source checkpoint `folder` (or its `gguf_file`) with the converted folder, both loaded in float32
    with the converted model's head; the report is logged and written to `verification.json`."""
    head = HEADS[head_of(AutoConfig.from_pretrained(converted))]
    source = head.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    result = head.from_pretrained(converted, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(converted)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    report = compare_outputs(source, result, tokenizer)
    (Path(converted) / "verification.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.warning("Verification against the source: %s", json.dumps(report))
    return report


def report_table(report: dict) -> list[str]:
    """The model card's verification section."""
    return [
        "## Verification",
        "",
        "Source and converted model run on the same sample inputs (`verification.json`):",
        "",
        "| output | max abs diff | relative error | KL(source ‖ converted) |",
        "|---|---|---|---|",
        *(
            f"| {name} | {f['max_abs_diff']:.2e} | {f['relative_error']:.2e} | "
            f"{format(f['kl'], '.2e') if 'kl' in f else '—'} |"
            for name, f in report["outputs"].items()
        ),
    ]


def _sample_inputs(model, tokenizer, seed):
    text_config = model.config.get_text_config()
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        inputs = dict(tokenizer(SAMPLE_TEXTS, padding=True, return_tensors="pt"))
    else:
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, text_config.vocab_size, (len(SAMPLE_TEXTS), 16), generator=generator)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    inputs.pop("token_type_ids", None)
    if text_config.is_encoder_decoder:
        inputs["decoder_input_ids"] = inputs["input_ids"]
    if type(model).__name__.endswith("ForMultipleChoice"):  # [batch, choices, length]: two questions of two choices
        inputs = {name: value.view(2, len(SAMPLE_TEXTS) // 2, -1) for name, value in inputs.items()}
    return inputs
