"""Multi-Head MoE (Wu et al. 2024, arXiv 2404.15045, Algorithm 1; v2: Huang et al., arXiv 2411.16205 §2.2;
official code yushuiwx/MH-MoE `tutel_moe_layer.py`), docs/mh_moe.md §2.

Departures from paper v1: the residual stays outside the merge (official code), so h = 1 is exactly the top-k
baseline; routing is the linear softmax of §1 (not the X-MoE cosine router); dropless unless a capacity is set.
"""

import math
from dataclasses import replace

import torch
from torch import nn
from transformers import initialization as init

from .experts import FfnSpec
from .moe_topk import MoeLayerOutput, TopKMoeLayer


class MultiHeadMoeLayer(TopKMoeLayer):
    """Head projection d->d, split into h sub-tokens of d/h, top-k routing per sub-token over experts of width
    d/h, merge, merge projection d->d. Head and merge projections exist iff h > 1."""

    def __init__(self, config, ffn: FfnSpec, layer_idx: int = 0):
        heads = config.moe_num_heads
        if ffn.hidden_size % heads:
            raise ValueError(f"moe_num_heads={heads} must divide hidden_size ({ffn.hidden_size}).")
        super().__init__(config, replace(ffn, hidden_size=ffn.hidden_size // heads), layer_idx)
        self.num_heads = heads
        if heads > 1:
            self.head_proj = nn.Linear(ffn.hidden_size, ffn.hidden_size)
            self.merge_proj = nn.Linear(ffn.hidden_size, ffn.hidden_size)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        if self.num_heads == 1:
            return  # no head or merge projection: h = 1 is the top-k baseline
        # official init: xavier_uniform with gain 1/sqrt(2) for the head, plain xavier for the merge; zero biases
        init.xavier_uniform_(self.head_proj.weight, gain=1 / math.sqrt(2))
        init.xavier_uniform_(self.merge_proj.weight)
        init.zeros_(self.head_proj.bias)
        init.zeros_(self.merge_proj.bias)

    def forward(self, hidden_states, padding_mask=None) -> MoeLayerOutput:
        # hidden_states [..., d] -> sub-tokens [T*h, d/h]; the h sub-tokens of a token are adjacent
        x = self.head_proj(hidden_states) if self.num_heads > 1 else hidden_states
        sub_mask = None if padding_mask is None else padding_mask.reshape(-1).repeat_interleave(self.num_heads)
        output = super().forward(x.reshape(-1, self.hidden_size), sub_mask)
        merged = output.hidden_states.reshape(hidden_states.shape)  # [..., d]
        output.hidden_states = self.merge_proj(merged) if self.num_heads > 1 else merged
        return output


def mh_moe_matched_sizes(
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    top_k: int,
    num_heads: int,
    gated: bool,
    mh_top_k: int | None = None,
) -> tuple[int, int]:
    """MH-MoE expert width and count matching a top-k SMoE of `num_experts` x `intermediate_size` (v2 Eq. 8-9).

    The width equalises FLOPs per token (head and merge cost 2d^2 when h > 1); the count then equalises parameters.
    Both are rounded: report actual parameter counts. Example (v2): d=768, 8x2048 SwiGLU top-1, h=2, k_mh=2 gives
    768 wide and 41 experts.
    """
    d, k_mh = hidden_size, mh_top_k or top_k
    matrices = 3 if gated else 2
    overhead = 2 * d * d if num_heads > 1 else 0
    width = (top_k * matrices * d * intermediate_size - overhead) / (k_mh * matrices * d)
    count = (num_experts * matrices * d * intermediate_size - overhead) / (matrices * (d / num_heads) * width)
    return round(width), round(count)
