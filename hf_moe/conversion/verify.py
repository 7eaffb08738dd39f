"""Check a conversion: run the source and the result on the same sample inputs and measure how far apart they are."""

import torch

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route every token to a few experts.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A short one.",
]


@torch.no_grad()
def compare_outputs(source_model, converted_model, tokenizer=None, seed: int = 0) -> dict:
    """Max |delta| and relative error of the main output (logits, else last hidden state), and, for logits, the mean
    KL(source || converted) over real tokens."""
    inputs = _sample_inputs(source_model.config.get_text_config(), tokenizer, seed)
    outputs = [model.eval()(**inputs) for model in (source_model, converted_model)]
    key = "logits" if "logits" in outputs[0] else "last_hidden_state"
    reference, converted = (output[key].float() for output in outputs)
    report = {
        "output": key,
        "max_abs_diff": (converted - reference).abs().max().item(),
        "relative_error": ((converted - reference).norm() / reference.norm()).item(),
    }
    if key == "logits":
        mask = inputs["attention_mask"].bool()
        kl = torch.nn.functional.kl_div(
            converted.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        report["kl"] = kl[mask].mean().item() if kl.shape == mask.shape else kl.mean().item()
    return report


def _sample_inputs(text_config, tokenizer, seed):
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
    return inputs
