"""`python -m hf_moe`: build every family over a small random BERT, run a labelled batch and print a summary.

A smoke run that needs no download; the fine-tuning quickstart on real data is `hf-moe quickstart` (README).
"""

import time

import torch

import hf_moe

BACKBONE = {
    "model_type": "bert",
    "vocab_size": 1000,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
}


def main():
    torch.manual_seed(0)
    input_ids = torch.randint(0, BACKBONE["vocab_size"], (8, 32))
    labels = torch.randint(0, 2, (8,))
    print(f"{'family':<14}{'params':>10}{'expert params':>15}{'loss':>9}{'aux loss':>10}{'ms/step':>9}")
    for config_class in hf_moe.FAMILY_CONFIGS:
        config = config_class(text_config=BACKBONE, num_experts=8, num_experts_per_tok=2, num_labels=2)
        model = hf_moe.MODEL_CLASSES[hf_moe.FAMILY_NAMES[config.model_type], "ForSequenceClassification"](config)
        start = time.perf_counter()
        output = model(input_ids=input_ids, labels=labels)
        output.loss.backward()
        elapsed = (time.perf_counter() - start) * 1000
        params = sum(p.numel() for p in model.parameters())
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        print(
            f"{config.model_type:<14}{params:>10,}{expert_params:>15,}"
            f"{output.loss.item():>9.4f}{output.aux_loss.item():>10.4f}{elapsed:>9.0f}"
        )


if __name__ == "__main__":
    main()
