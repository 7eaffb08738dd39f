"""HyperRouter (Do et al., EMNLP 2023; official code giangdip2410/HyperRouter `custom_gate.py`): a frozen random
hypernetwork generates each layer's router weight and bias from a small trainable embedding (docs/hyperrouter.md §2).

Departures from the official code: the hypernetwork is held as buffers saved with the model (so the router is
reproducible without RNG state, and no loader, optimizer or PEFT wrapper can make it trainable), and k is fixed unless
a training callback changes it.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .moe_topk import TopKMoeLayer
from .routing import router_dtype


class FrozenLinear(nn.Module):
    """A linear layer whose `weight` and `bias` are persistent buffers: checkpoint keys as nn.Linear's, moved and cast
    with the model, never trainable (transformers' loader turns every loaded parameter back into a trainable one)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features))
        self.register_buffer("bias", torch.empty(out_features))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class HyperRouterGate(nn.Module):
    """theta = Lin(d->H) -> ReLU -> Lin(H->E*(d+1)) of the embedding e; W_r = theta[:, :d], b_r = theta[:, d]."""

    def __init__(self, config, hidden_size: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.initializer_range = config.initializer_range
        self.router_embedding = nn.Parameter(torch.empty(hidden_size))  # e, trainable
        self.hypernet = nn.Sequential(  # frozen, as the official name filter on "hypernet" does
            FrozenLinear(hidden_size, config.hyper_router_hidden_dim),
            nn.ReLU(),
            FrozenLinear(config.hyper_router_hidden_dim, config.num_experts * (hidden_size + 1)),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        init.normal_(self.router_embedding, std=1.0)  # e ~ N(0, 1), official code
        for linear in (self.hypernet[0], self.hypernet[2]):
            init.normal_(linear.weight, std=self.initializer_range)
            init.zeros_(linear.bias)

    def forward(self, x):
        # regenerated every forward: W_r depends on no input, only on e (d numbers per layer receive gradient)
        dtype = router_dtype(x.dtype)
        theta = self.hypernet(self.router_embedding).to(dtype).view(self.num_experts, -1)  # [E, d+1]
        return F.linear(x.to(dtype), theta[:, :-1], theta[:, -1])  # [T, E]


class HyperRouterLayer(TopKMoeLayer):
    """Top-k on the generated logits, softmax over the k selected (= renormalised top-k of the full softmax)."""

    router_class = HyperRouterGate
