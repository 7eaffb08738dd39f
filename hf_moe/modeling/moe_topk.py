"""The top-k sparse MoE layer (docs/topk.md §2), and the template every other family specialises.

A family changes one step of `forward`: how logits are made (`router_class`), how experts are chosen (`select`),
what is computed from the choice (`moe_output`), or which statistics are reported (`router_losses`).
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .experts import FfnSpec, build_experts
from .routing import (
    drop_over_capacity,
    expert_load,
    load_balancing_loss,
    masked_mean,
    router_dtype,
    router_entropy,
    router_z_loss,
    top_k_routing,
)


@dataclass
class MoeLayerOutput(ModelOutput):
    """
    Output of one MoE layer.

    Args:
        hidden_states (`torch.Tensor` of the input's shape): the layer's output (without the block's residual).
        router_logits (`torch.Tensor` of shape `(routed_tokens, num_experts)`): float32 (or wider) router logits;
            MH-MoE routes `moe_num_heads` sub-tokens per token.
        aux_loss (`torch.Tensor`): load-balancing loss of this layer, unweighted, padding excluded.
        z_loss (`torch.Tensor`): router z-loss, unweighted, padding excluded.
        entropy_loss (`torch.Tensor`): mean router entropy over non-padding tokens (a loss term for dynamic top-p).
        expert_load (`torch.Tensor` of shape `(num_experts,)`): fraction of non-padding tokens routed to each expert
            (before capacity drops).
        mean_experts_per_token (`torch.Tensor`): experts selected per non-padding token (k for top-k).
    """

    hidden_states: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    entropy_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    mean_experts_per_token: torch.Tensor | None = None


class Router(nn.Module):
    """Linear router without bias (`weight` [E, H]); computes in float32 or wider whatever the model dtype."""

    def __init__(self, config, hidden_size: int):
        super().__init__()
        self.initializer_range = config.initializer_range
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # N(0, initializer_range): a zero router ties every token to the same top-k experts (docs/topk.md §4)
        init.normal_(self.weight, std=self.initializer_range)

    def forward(self, x):
        dtype = router_dtype(x.dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype))  # [T, E]


class TopKMoeLayer(nn.Module):
    """Softmax over all experts, top-k, optional renormalisation, jitter and capacity; Switch balance and z-loss."""

    router_class = Router

    def __init__(self, config, ffn: FfnSpec, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = ffn.hidden_size
        self.num_experts = config.num_experts
        self.router = self.router_class(config, ffn.hidden_size)
        expert_ffn = replace(ffn, intermediate_size=config.moe_intermediate_size or ffn.intermediate_size)
        self.experts = build_experts(config, expert_ffn, config.num_experts)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> MoeLayerOutput:
        # hidden_states [..., H]; padding_mask [...] with 1 for real tokens
        x = hidden_states.reshape(-1, self.hidden_size)  # [T, H]
        token_mask = None if padding_mask is None else padding_mask.reshape(-1).bool()  # [T]
        logits = self.router(self.jitter(x))  # [T, E]
        probs = logits.softmax(-1)
        index, weights = self.select(probs)  # [T, k], [T, k]
        output = self.moe_output(x, index, weights, token_mask)
        return MoeLayerOutput(
            hidden_states=output.view_as(hidden_states),
            router_logits=logits,
            **self.router_losses(logits, probs, index, token_mask),
        )

    def jitter(self, x):
        eps = self.config.router_jitter_noise
        if not (self.training and eps > 0):
            return x
        return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)

    def select(self, probs):
        top_k = self.config.num_experts_per_tok
        if not 1 <= top_k <= self.num_experts:  # checked here: the config can change after construction
            raise ValueError(
                f"num_experts_per_tok={top_k} must be between 1 and num_experts ({self.num_experts}); "
                "set model.config.num_experts_per_tok within that range."
            )
        return top_k_routing(probs, top_k, self.config.normalize_topk(top_k))

    def moe_output(self, x, index, weights, token_mask):
        if self.config.expert_capacity_factor is not None:
            index, weights = drop_over_capacity(
                index, weights, self.num_experts, self.config.expert_capacity_factor, token_mask
            )
        return self.experts(x, index, weights)

    def router_losses(self, logits, probs, index, token_mask) -> dict:
        load = expert_load(index, self.num_experts, token_mask, probs.dtype)  # [E]
        return {
            "aux_loss": load_balancing_loss(probs, load, token_mask),
            "z_loss": router_z_loss(logits, token_mask),
            "entropy_loss": router_entropy(probs, token_mask),
            "expert_load": load,
            "mean_experts_per_token": masked_mean((index < self.num_experts).sum(-1).to(probs.dtype), token_mask),
        }
