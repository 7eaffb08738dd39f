"""HyperMoE (Zhao et al., ACL 2024, arXiv 2402.12656; official code Bumble666/Hyper_MoE
`adapter_generators.py`, `modeling_switch_transformers.py`), docs/hypermoe.md §2.

Each token gets, besides its top-k experts, a bottleneck adapter (the HyperExpert) whose weights a hypernetwork
generates from the sum of the embeddings of the experts the token did NOT select. The generated weights depend on
the token only through its selected set, so we generate once per distinct set in the batch and apply the adapters
grouped (docs/hypermoe.md §7): the same math as per-token generation, without a [tokens, d, r] tensor.

Departures from the official code: general k (the Switch code has k = 1); the tiny generator init is kept for every
backbone (the GPT-2 variant's generic init overwrites it); no jitter on the experts' input.
"""

import math

import torch
from torch import nn
from transformers import initialization as init

from .experts import FfnSpec
from .moe_topk import TopKMoeLayer


class HyperExpertGenerator(nn.Module):
    """The generator shared by all MoE layers of a stack: g = ReLU(Lin([u, EmbLayer[l]])) and four linear heads
    giving W_down [d, r], b_down [r], W_up [r, d], b_up [d]."""

    def __init__(self, config, hidden_size: int, num_layers: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = config.hyper_adapter_rank
        trunk_dim = config.hyper_hidden_dim
        self.layer_embedding = nn.Embedding(num_layers, config.hyper_layer_embedding_dim)
        self.trunk = nn.Linear(config.hyper_embedding_dim + config.hyper_layer_embedding_dim, trunk_dim)
        self.weight_down = nn.Linear(trunk_dim, hidden_size * self.rank)
        self.bias_down = nn.Linear(trunk_dim, self.rank)
        self.weight_up = nn.Linear(trunk_dim, self.rank * hidden_size)
        self.bias_up = nn.Linear(trunk_dim, hidden_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        init.normal_(self.layer_embedding.weight, std=1.0)
        _torch_default_linear_init(self.trunk)
        # official `adapter_generators.py`: U(-a, a) heads with a tiny a, zero head biases, so HyperMoE = MoE at step 0
        trunk_dim = self.trunk.out_features
        for head, fan in ((self.weight_down, self.hidden_size), (self.weight_up, self.rank)):
            bound = 1e-3 * math.sqrt(3 / (trunk_dim * fan))
            init.uniform_(head.weight, -bound, bound)
        for head in (self.bias_down, self.bias_up):
            bound = 1e-3 * math.sqrt(3 / trunk_dim)
            init.uniform_(head.weight, -bound, bound)
        for head in (self.weight_down, self.bias_down, self.weight_up, self.bias_up):
            init.zeros_(head.bias)

    def forward(self, set_features: torch.Tensor, layer_idx: int):
        # set_features [G, hyper_embedding_dim]: one row per distinct selection set
        num_sets = set_features.shape[0]
        layer = self.layer_embedding.weight[layer_idx].expand(num_sets, -1)
        g = torch.relu(self.trunk(torch.cat([set_features, layer], dim=-1)))  # [G, trunk]
        return (
            self.weight_down(g).view(num_sets, self.hidden_size, self.rank),  # [G, d, r]
            self.bias_down(g),  # [G, r]
            self.weight_up(g).view(num_sets, self.rank, self.hidden_size),  # [G, r, d]
            self.bias_up(g),  # [G, d]
        )


class HyperMoeLayer(TopKMoeLayer):
    """Top-k MoE output plus the HyperExpert of the token's unselected experts (unweighted sum, docs/hypermoe.md §2).

    `generator` is shared by the layers of a stack and owned by the model, so it is held here unregistered.
    """

    def __init__(self, config, ffn: FfnSpec, layer_idx: int, generator: HyperExpertGenerator):
        super().__init__(config, ffn, layer_idx)
        dim = config.hyper_embedding_dim
        self.expert_embedding = nn.Embedding(config.num_experts, dim)  # EmbExp_l
        self.embedding_process = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.__dict__["generator"] = generator
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Initialise this layer's own HyperMoE parameters (router and experts initialise themselves)."""
        init.normal_(self.expert_embedding.weight, std=1.0)
        _torch_default_linear_init(self.embedding_process[0])
        _torch_default_linear_init(self.embedding_process[2])


    def moe_output(self, x, index, weights, token_mask):
        # `index` is the selection before any capacity drop, as in the official code
        return super().moe_output(x, index, weights, token_mask) + self.hyper_expert(x, index)

    def hyper_expert(self, x, index):
        if torch.compiler.is_compiling():
            # torch.compile/export need static shapes: one adapter per token instead of per distinct set (same math)
            w_down, b_down, w_up, b_up = self.adapters(index, x.dtype)
            hidden = torch.relu(torch.bmm(x[:, None], w_down)[:, 0] + b_down)  # [T, r]
            return torch.bmm(hidden[:, None], w_up)[:, 0] + b_up
        # a set is keyed by its sorted indices (any number of experts; a sentinel slot, index E, selects nothing)
        sets, set_of_token = index.sort(-1).values.unique(dim=0, return_inverse=True)  # [G, k], [T]
        w_down, b_down, w_up, b_up = self.adapters(sets, x.dtype)

        order = set_of_token.argsort(stable=True)
        counts = torch.bincount(set_of_token, minlength=len(sets)).tolist()
        pieces = [
            torch.relu(chunk @ w_down[g] + b_down[g]) @ w_up[g] + b_up[g]
            for g, chunk in enumerate(x[order].split(counts))
        ]
        return torch.zeros_like(x).index_copy(0, order, torch.cat(pieces))  # [T, d]

    def adapters(self, sets, dtype):
        """HyperExpert weights for each selection in `sets` [G, k], from the embeddings of its unselected experts."""
        selected = torch.zeros(sets.shape[0], self.num_experts + 1, dtype=dtype, device=sets.device)
        unselected = 1 - selected.scatter_(1, sets, 1.0)[:, : self.num_experts]  # [G, E]
        set_features = self.embedding_process(unselected @ self.expert_embedding.weight)  # [G, emb]
        return self.generator(set_features, self.layer_idx)


def _torch_default_linear_init(linear: nn.Linear):
    """PyTorch's own nn.Linear init (the official code's), through transformers' skip-if-loaded init functions."""
    init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(linear.in_features)
    init.uniform_(linear.bias, -bound, bound)
