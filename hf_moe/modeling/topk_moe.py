"""The top-k sparse MoE layer (docs/topk.md §2), and the template every other family specialises.

A family changes one step of `forward`: how logits are made (`build_router`), how experts are chosen (`select`),
what is computed from the choice (`moe_output`), or which statistics are reported (`router_losses`).
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_hf_moe import TopKMoeConfig
from .experts import FfnSpec, build_experts
from .registry import MoeFamily
from .routing import (
    capacity_mask,
    mixtral_balance_loss,
    router_dtype,
    router_statistics,
    router_z_loss,
    switch_balance_loss,
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
        expert_index (`torch.Tensor` of shape `(routed_tokens, k)`): the experts each routed token was sent to, after
            capacity drops (`num_experts` for a dropped or empty slot); read by `router_loss_pooling="switch"`.
        token_mask (`torch.Tensor` of shape `(routed_tokens,)`, *optional*): True for the tokens the statistics count
            (None: all); read by `router_loss_pooling="mixtral"`.
    """

    hidden_states: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    entropy_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    mean_experts_per_token: torch.Tensor | None = None
    expert_index: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None


class Router(nn.Module):
    """Linear router without bias (`weight` [E, H]); computes in the dtype of its input, which the layer casts to
    `router_dtype` (docs/topk.md §6, item 3)."""

    def __init__(self, config, hidden_size: int):
        super().__init__()
        self.initializer_range = config.initializer_range
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # N(0, initializer_range): a zero router ties every token to the same top-k experts (docs/topk.md §4)
        init.normal_(self.weight, std=self.initializer_range)

    @torch.no_grad()
    def init_trainable(self, std: float, generator: torch.Generator | None = None):
        """Draw the router weight from N(0, std) (zeros for std = 0): upcycling's `router_init`
        (docs/upcycling.md §2)."""
        self.weight.normal_(0.0, std, generator=generator) if std else self.weight.zero_()

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))  # [T, E]


class TopKMoeLayer(nn.Module):
    """Softmax over all experts, top-k, optional renormalisation, jitter and capacity; Switch balance and z-loss."""


    def __init__(self, config, ffn: FfnSpec, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = ffn.hidden_size
        self.num_experts = config.num_experts
        self.router = self.build_router(config, ffn.hidden_size)
        expert_ffn = replace(ffn, intermediate_size=config.moe_intermediate_size or ffn.intermediate_size)
        self.experts = build_experts(config, expert_ffn, config.num_experts)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> MoeLayerOutput:
        # hidden_states [..., S, H]; padding_mask [..., S] with 1 for real tokens
        x = hidden_states.reshape(-1, self.hidden_size)  # [T, H]
        token_mask = None if padding_mask is None else padding_mask.reshape(-1).bool()  # [T]
        router_input = self.jitter(x)
        if self.config.router_jitter_scope != "router":
            x = router_input  # the experts see the jittered input too (docs/topk.md §6, item 4)
        router_input = router_input.to(router_dtype(x.dtype, self.config.router_dtype))
        logits = self.router(router_input).to(router_dtype(x.dtype))  # [T, E]; softmax and statistics in float32+
        probs = logits.softmax(-1)
        index, weights = self.select(probs)  # [T, k], [T, k]
        kept = self.capacity_mask(index, token_mask, hidden_states)  # [T, k], None when dropless
        output = self.moe_output(x, index, weights, kept)
        return MoeLayerOutput(
            hidden_states=output.view_as(hidden_states),
            router_logits=logits,
            expert_index=index if kept is None else index.masked_fill(~kept, self.num_experts),
            token_mask=token_mask,
            **self.router_losses(logits, probs, index, token_mask),
        )

    def build_router(self, config, hidden_size: int) -> nn.Module:
        """The module mapping router inputs [T, H] to logits [T, E]."""
        return Router(config, hidden_size)

    def jitter(self, x):
        """x times U(1 - eps, 1 + eps) noise, in training (and at eval for `router_jitter_scope="input_always"`)."""
        eps = self.config.router_jitter_noise
        if not ((self.training or self.config.router_jitter_scope == "input_always") and eps > 0):
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

    def capacity_mask(self, index, token_mask, hidden_states):
        """[T, k] bool, True for the slots within the capacity of `expert_capacity_rule`; None when dropless
        (docs/topk.md §6, item 5 and §7; docs/mh_moe.md §6, item 3)."""
        config = self.config
        if config.expert_capacity_rule == "switch":  # per sequence, padding included: Switch's router reads no mask
            if hidden_states.dim() < 3:
                raise ValueError(
                    'expert_capacity_rule="switch" counts per sequence and needs the layer input as [batch, seq, '
                    'hidden]; MH-MoE routes its sub-tokens flattened: use "gshard" or "hf_moe".'
                )
            return capacity_mask(index, self.num_experts, config.expert_capacity, hidden_states.shape[-2])
        if config.expert_capacity_rule == "gshard":  # k * ceil(S' / E) over the routed rows of the batch
            num_routed = index.shape[0] if token_mask is None else int(token_mask.sum())
            capacity = index.shape[1] * math.ceil(num_routed / self.num_experts)
            return capacity_mask(index, self.num_experts, capacity, token_mask=token_mask)
        if config.expert_capacity_factor is None:
            return None
        routed = index if token_mask is None else index.masked_fill(~token_mask[:, None], self.num_experts)
        num_slots = int((routed < self.num_experts).sum())  # routed slots of the real tokens (T*k for top-k)
        capacity = math.ceil(config.expert_capacity_factor * num_slots / self.num_experts)
        return capacity_mask(index, self.num_experts, capacity, token_mask=token_mask)

    def moe_output(self, x, index, weights, kept):
        """Each token's experts summed with `weights`, over the slots `kept` [T, k] (None: all). A dropped slot gives
        0, or with `dropped_token_output="scaled_input"` its weight times x (docs/hypermoe.md §6, item 3)."""
        if kept is None:
            return self.run_experts(x, index, weights)
        output = self.run_experts(x, index.masked_fill(~kept, self.num_experts), weights.masked_fill(~kept, 0.0))
        if self.config.dropped_token_output == "scaled_input":
            output = output + weights.masked_fill(kept, 0.0).sum(-1, keepdim=True).to(x.dtype) * x
        return output

    def run_experts(self, x, index, weights):
        """The experts on x [T, H] with `index` and `weights` [T, k]. Under expert parallelism the experts hold only
        this rank's share (`num_experts` local) and slots travel between ranks by global expert id, so an empty slot
        (top-p padding, a capacity drop) goes to expert 0 with weight 0 instead of the sentinel id, which no rank
        owns (docs/backbones.md §5)."""
        if self.experts.num_experts != self.num_experts:
            empty = index == self.num_experts
            index, weights = index.masked_fill(empty, 0), weights.masked_fill(empty, 0.0)
        return self.experts(x, index, weights)

    def router_losses(self, logits, probs, index, token_mask) -> dict:
        return router_statistics(logits, probs, index, token_mask)


def pooled_router_losses(layer_outputs: list[MoeLayerOutput], stacks: list[str], pooling: str):
    """(balance loss, z-loss) of one forward's MoE layers, `layer_outputs` in call order, pooled as
    `router_loss_pooling` says; `stacks` names each layer's stack. docs/topk.md §6, items 1-2."""
    if pooling == "per_layer":
        return sum(o.aux_loss for o in layer_outputs), sum(o.z_loss for o in layer_outputs)
    if pooling == "mixtral":  # Mixtral has no z-loss: it stays per layer
        aux_loss = mixtral_balance_loss(
            [o.router_logits for o in layer_outputs],
            [o.expert_load for o in layer_outputs],
            [o.token_mask for o in layer_outputs],
        )
        return aux_loss, sum(o.z_loss for o in layer_outputs)
    aux_loss = z_loss = 0
    for stack in dict.fromkeys(stacks):  # Switch adds the encoder's and the decoder's losses
        outputs = [o for o, name in zip(layer_outputs, stacks) if name == stack]
        # [B, S', E] and [B, S', k]: the stack's layers concatenated along the sequence axis
        logits = torch.cat([o.router_logits.unflatten(0, (o.hidden_states.shape[0], -1)) for o in outputs], dim=1)
        index = torch.cat([o.expert_index.unflatten(0, (o.hidden_states.shape[0], -1)) for o in outputs], dim=1)
        aux_loss = aux_loss + switch_balance_loss(logits, index)
        z_loss = z_loss + router_z_loss(logits.flatten(0, 1))  # every token of every layer, padding included
    return aux_loss, z_loss


FAMILY = MoeFamily(
    config_class=TopKMoeConfig,
    layer_class=TopKMoeLayer,
    init_modules=(Router,),
    peft_modules_to_save=("router",),
    moe_sources=("mixtral", "switch_transformers"),
)
