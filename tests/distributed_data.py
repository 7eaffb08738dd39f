"""The batches of tests/test_distributed.py, shared with its torchrun worker."""

import torch

LR = 0.5


def padded_batch() -> dict:
    """2 sequences of 7 tokens, the second left-padded by 3."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 64, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def global_batch() -> torch.Tensor:
    """4 unpadded sequences of 6 tokens: data-parallel ranks take 2 each, so every rank predicts as many tokens."""
    return torch.randint(3, 64, (4, 6), generator=torch.Generator().manual_seed(1))
