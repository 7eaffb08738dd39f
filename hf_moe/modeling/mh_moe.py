"""Multi-Head MoE (Wu et al. 2024, arXiv 2404.15045, Algorithm 1; v2: Huang et al., arXiv 2411.16205 §2.2;
official code yushuiwx/MH-MoE `tutel_moe_layer.py`), docs/mh_moe.md §2.

Departures from paper v1: the residual stays outside the merge (official code), so h = 1 is exactly the top-k
baseline; routing is the linear softmax of §1 (not the X-MoE cosine router); dropless unless a capacity is set.
`moe_residual_inside` and `router_type="xmoe"` give the paper's choices, and further options the official code's
(docs/mh_moe.md §6).
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_hf_moe import MultiHeadMoeConfig
from .experts import FfnSpec
from .registry import MoeFamily
from .routing import expert_load, load_balancing_loss
from .topk_moe import MoeLayerOutput, Router, TopKMoeLayer


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

    def build_router(self, config, hidden_size: int) -> nn.Module:
        if config.router_type == "xmoe":  # the paper's X-MoE router (docs/mh_moe.md §6, item 2)
            return CosineRouter(config, hidden_size)
        if config.router_init == "torch_default":  # the official gate's init (docs/mh_moe.md §6, item 8)
            return TorchInitRouter(config, hidden_size)
        return super().build_router(config, hidden_size)

    @torch.no_grad()
    def reset_parameters(self):
        if self.num_heads == 1:
            return  # no head or merge projection: h = 1 is the top-k baseline
        # official init: xavier_uniform with gain 1/sqrt(2) for the head, plain xavier for the merge, zero merge bias
        init.xavier_uniform_(self.head_proj.weight, gain=1 / math.sqrt(2))
        init.xavier_uniform_(self.merge_proj.weight)
        if self.config.head_proj_bias_init == "torch_default":  # official: nn.Linear's bias init (§6, item 6)
            bound = 1 / math.sqrt(self.head_proj.in_features)
            init.uniform_(self.head_proj.bias, -bound, bound)
        else:
            init.zeros_(self.head_proj.bias)
        init.zeros_(self.merge_proj.bias)

    def forward(self, hidden_states, padding_mask=None) -> MoeLayerOutput:
        # hidden_states [..., d] -> sub-tokens [T*h, d/h]; the h sub-tokens of a token are adjacent
        x = self.head_proj(hidden_states) if self.num_heads > 1 else hidden_states
        sub_mask = None
        if padding_mask is not None and self.config.router_ignore_padding_tokens:  # docs/mh_moe.md §6, item 5
            sub_mask = padding_mask.reshape(-1).repeat_interleave(self.num_heads)
        output = super().forward(x.reshape(-1, self.hidden_size), sub_mask)
        merged = output.hidden_states.reshape(hidden_states.shape)  # [..., d]
        if self.config.moe_residual_inside:  # paper v1 Eq. 6: each sub-token's residual, before the merge (§6, item 1)
            merged = merged + x
        output.hidden_states = self.merge_proj(merged) if self.num_heads > 1 else merged
        return output

    def router_losses(self, logits, probs, index, token_mask) -> dict:
        losses = super().router_losses(logits, probs, index, token_mask)
        if self.config.router_aux_loss_top1:
            # official `gshard_loss`: E · sum_e f1_e · mean_P_e, f1 counting first choices only (§6, item 4)
            first_choice_load = expert_load(index[:, :1], self.num_experts, token_mask, probs.dtype)  # [E]
            losses["aux_loss"] = load_balancing_loss(probs, first_choice_load, token_mask)
        return losses


class TorchInitRouter(Router):
    """The linear router with PyTorch's nn.Linear init U(±1/sqrt(H)), as the official gate `wg`
    (docs/mh_moe.md §6, item 8)."""

    @torch.no_grad()
    def reset_parameters(self):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))


class CosineRouter(nn.Module):
    """X-MoE routing as the MH-MoE paper describes it (docs/mh_moe.md §6, item 2): logits cos(W·x, e_i) / tau, with
    W [r, H] projecting into an r-dimensional routing space and expert embeddings e_i [r]."""

    def __init__(self, config, hidden_size: int):
        super().__init__()
        self.temperature = config.router_temperature
        self.projection = nn.Parameter(torch.empty(config.router_xmoe_dim, hidden_size))  # W
        self.expert_embedding = nn.Parameter(torch.empty(config.num_experts, config.router_xmoe_dim))  # e_i
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # as the official `use_xmoe` branch: nn.Linear's init for W, orthogonal embeddings with gain 0.32
        init.kaiming_uniform_(self.projection, a=math.sqrt(5))
        init.orthogonal_(self.expert_embedding, gain=0.32)

    def init_trainable(self, std: float, generator: torch.Generator | None = None):
        raise ValueError(
            "router_init and router_init_std set a linear router's weight; the X-MoE router (router_type='xmoe') "
            "keeps its own initialisation: leave them at their defaults."
        )

    def forward(self, x):
        # x [T, H], already in the router's dtype (the layer casts it)
        routed = F.normalize(F.linear(x, self.projection.to(x.dtype)), dim=-1)  # [T, r]
        experts = F.normalize(self.expert_embedding.to(x.dtype), dim=-1)  # [E, r]
        return routed @ experts.t() / self.temperature  # [T, E]


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


def _upcycling_departure(config, zeroed: bool) -> str:
    return "MH-MoE experts act on d/h-wide sub-tokens, so they start fresh rather than as FFN copies"


FAMILY = MoeFamily(
    config_class=MultiHeadMoeConfig,
    layer_class=MultiHeadMoeLayer,
    init_modules=(Router, CosineRouter, MultiHeadMoeLayer),
    peft_modules_to_save=("router", "head_proj", "merge_proj"),
    experts_from_dense_ffn=False,
    upcycling_departure=_upcycling_departure,
    moe_source_refusal="MH-MoE experts act on d/h-wide sub-tokens behind new projections, so the source's trained "
    "experts cannot be reused",
)
