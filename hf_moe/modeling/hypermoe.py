"""HyperMoE (Zhao et al., ACL 2024, arXiv 2402.12656; official code Bumble666/Hyper_MoE
`adapter_generators.py`, `modeling_switch_transformers.py`), docs/hypermoe.md §2.

Each token gets, besides its top-k experts, a bottleneck adapter (the HyperExpert) whose weights a hypernetwork
generates from the sum of the embeddings of the experts the token did NOT select. The generated weights depend on
the token only through its selected set, so we generate once per distinct set in the batch and apply the adapters
with one grouped matmul per projection (docs/hypermoe.md §7): the same math as per-token generation, without a
[tokens, d, r] tensor. At inference the adapters are also cached per set, so decoding steps reuse them.

Departures from the official code: general k (the Switch code has k = 1); the tiny generator init is kept for every
backbone (the GPT-2 variant's generic init overwrites it; `hyper_init="normal"` reproduces that); the linear router
for every backbone (`router_type="noisy_top_k"` gives the GPT-2 variant's); no jitter on the experts' input.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.integrations.moe import _grouped_mm

from .configuration_hf_moe import HyperMoeConfig
from .experts import FfnSpec
from .registry import MoeFamily
from .routing import router_dtype, selection_mask
from .topk_moe import MoeLayerOutput, Router, TopKMoeLayer


class HyperExpertGenerator(nn.Module):
    """The generator shared by all MoE layers of a stack: g = ReLU(Lin([u, EmbLayer[l]])) and four linear heads
    giving W_down [d, r], b_down [r], W_up [r, d], b_up [d]."""

    def __init__(self, config, hidden_size: int, num_layers: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = config.hyper_adapter_rank
        self.hyper_init = config.hyper_init
        self.initializer_range = config.initializer_range
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
        if self.hyper_init == "normal":
            modules = (self.layer_embedding, self.trunk, self.weight_down, self.bias_down, self.weight_up, self.bias_up)
            _gpt2_generic_init(modules, self.initializer_range)
            return
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


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gate of the official GPT-2 variant (Shazeer et al. 2017; docs/hypermoe.md §6, item 7): clean
    logits x·W_gate and, in training, the noise scale softplus(x·W_noise) + 0.01. `weight`, `noise_weight` [E, H]."""

    def __init__(self, config, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))  # w_gate, transposed
        self.noise_weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))  # w_noise, transposed
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # official: both zero-initialised, so training starts from uniformly random routing
        init.zeros_(self.weight)
        init.zeros_(self.noise_weight)

    @torch.no_grad()
    def init_trainable(self, std: float, generator: torch.Generator | None = None):
        """Draw W_gate from N(0, std) (zeros for std = 0); W_noise keeps its zero init (upcycling's `router_init`)."""
        self.weight.normal_(0.0, std, generator=generator) if std else self.weight.zero_()

    def forward(self, x):
        """Clean logits [T, E] and the noise scale [T, E] (None at eval, where the logits stay clean), in x's dtype."""
        clean = F.linear(x, self.weight.to(x.dtype))
        if not self.training:
            return clean, None
        return clean, F.softplus(F.linear(x, self.noise_weight.to(x.dtype))) + 0.01


class AdapterCache(NamedTuple):
    """The adapters generated at inference for the selection sets met so far (`keys` [C], ascending), and what they
    were generated from (`params`, held so that their ids stay theirs; `state`, compared at every call)."""

    params: tuple
    state: tuple
    keys: torch.Tensor
    adapters: tuple


class HyperMoeLayer(TopKMoeLayer):
    """Top-k MoE output plus the HyperExpert of the token's unselected experts (unweighted sum, docs/hypermoe.md §2).

    `generator` is shared by the layers of a stack and owned by the model, so it is held here unregistered; so is
    `adapter_cache`, the adapters generated at inference (`cached_adapters`), which is no state to save.
    """

    adapter_cache_bytes = 64 * 2**20  # per layer; a batch that would grow the cache past it restarts it

    def __init__(self, config, ffn: FfnSpec, layer_idx: int, generator: HyperExpertGenerator):
        super().__init__(config, ffn, layer_idx)
        dim = config.hyper_embedding_dim
        self.expert_embedding = nn.Embedding(config.num_experts, dim)  # EmbExp_l
        self.embedding_process = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.__dict__["generator"] = generator
        self.__dict__["adapter_cache"] = None
        self.reset_parameters()

    def __getstate__(self):
        """Pickling and `deepcopy` leave the adapter cache behind."""
        return {**super().__getstate__(), "adapter_cache": None}

    def train(self, mode: bool = True):
        """Also drops the adapter cache: `train()`/`eval()` refresh it after edits no version counter sees (`.data`)."""
        self.__dict__["adapter_cache"] = None
        return super().train(mode)

    def build_router(self, config, hidden_size: int) -> nn.Module:
        if config.router_type == "noisy_top_k":  # the official GPT-2 variant's gate (docs/hypermoe.md §6, item 7)
            return NoisyTopKRouter(config, hidden_size)
        return super().build_router(config, hidden_size)

    @torch.no_grad()
    def reset_parameters(self):
        """Initialise this layer's own HyperMoE parameters (router and experts initialise themselves)."""
        if self.config.hyper_init == "normal":
            modules = (self.expert_embedding, self.embedding_process[0], self.embedding_process[2])
            _gpt2_generic_init(modules, self.config.initializer_range)
            return
        init.normal_(self.expert_embedding.weight, std=1.0)
        _torch_default_linear_init(self.embedding_process[0])
        _torch_default_linear_init(self.embedding_process[2])

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> MoeLayerOutput:
        if self.config.router_type == "linear":
            return super().forward(hidden_states, padding_mask)
        return self.noisy_top_k_forward(hidden_states, padding_mask)

    def noisy_top_k_forward(self, hidden_states, padding_mask) -> MoeLayerOutput:
        """The official GPT-2 variant: noisy logits in training, clean at eval; the balance loss is
        CV²(importance) + CV²(load) (docs/hypermoe.md §6, item 7)."""
        x = hidden_states.reshape(-1, self.hidden_size)  # [T, H]
        token_mask = None if padding_mask is None else padding_mask.reshape(-1).bool()  # [T]
        router_input = self.jitter(x)
        if self.config.router_jitter_scope != "router":
            x = router_input  # the experts see the jittered input too (docs/topk.md §6, item 4)
        clean, noise_scale = self.router(router_input.to(router_dtype(x.dtype, self.config.router_dtype)))
        noisy = clean if noise_scale is None else clean + torch.randn_like(clean) * noise_scale  # [T, E]
        stats_dtype = router_dtype(x.dtype)  # softmax, loss and statistics in float32+
        logits, clean = noisy.to(stats_dtype), clean.to(stats_dtype)
        noise_scale = None if noise_scale is None else noise_scale.to(stats_dtype)
        probs = logits.softmax(-1)
        index, weights = self.select(probs)  # [T, k], [T, k]
        kept = self.capacity_mask(index, token_mask, hidden_states)  # [T, k], None when dropless
        output = self.moe_output(x, index, weights, kept)
        losses = self.router_losses(logits, probs, index, token_mask)
        losses["aux_loss"] = noisy_top_k_balance_loss(clean, logits, noise_scale, probs, index, weights, token_mask)
        expert_index = index if kept is None else index.masked_fill(~kept, self.num_experts)
        return MoeLayerOutput(
            hidden_states=output.view_as(hidden_states),
            router_logits=logits,
            expert_index=expert_index,
            token_mask=token_mask,
            **losses,
        )

    def moe_output(self, x, index, weights, kept):
        # `index` is the selection before any capacity drop, as in the official code
        return super().moe_output(x, index, weights, kept) + self.hyper_expert(x, index)

    def hyper_expert(self, x, index):
        """Each token's HyperExpert output [T, d]: the adapter of its selection set (`index` [T, k]) applied to x."""
        num_experts = self.num_experts
        if torch.compiler.is_compiling():
            # torch.compile/export need static shapes: one adapter per token instead of per distinct set (same math)
            return apply_token_adapters(x, self.adapters(selection_mask(index, num_experts, x.dtype)))
        if num_experts > MAX_EXPERTS_KEYED:  # a set's bitmask would overflow int64: batch-local sets, no cache
            rows, set_of_token = index.sort(-1).values.unique(dim=0, return_inverse=True)  # [G, k], [T]
            return apply_adapters(x, set_of_token, self.adapters(selection_mask(rows, num_experts, x.dtype)))
        # a set is keyed by the bitmask of its experts (any number of them; a sentinel slot, index E, selects nothing)
        keys = torch.where(index < num_experts, 1 << index, 0).sum(-1)  # [T]
        if self.training or torch.is_grad_enabled():
            unique_keys, set_of_token = keys.unique(return_inverse=True)  # [G], [T]
            return apply_adapters(x, set_of_token, self.adapters(key_mask(unique_keys, num_experts, x.dtype)))
        return apply_adapters(x, *self.cached_adapters(keys, x.dtype))

    def adapters(self, selected):
        """HyperExpert weights for each row of `selected` [G, E] (1 for a selected expert), from the embeddings of
        the unselected experts."""
        set_features = self.embedding_process((1 - selected) @ self.expert_embedding.weight)  # [G, emb]
        return self.generator(set_features, self.layer_idx)

    def cached_adapters(self, keys, dtype):
        """Inference: each token's row [T] in the adapters of every set met since the parameters they are generated
        from last changed. A set's adapter is generated once, with the other sets its batch meets first."""
        params, state = self.adapter_state(dtype, keys.device.type)
        cache = self.adapter_cache
        if cache is not None and cache.state != state:
            cache = None
        if cache is not None:
            slot = torch.searchsorted(cache.keys, keys).clamp_(max=cache.keys.shape[0] - 1)  # [T]
            missing = cache.keys[slot] != keys  # [T]
            if not missing.any():
                return slot, cache.adapters
            new_keys = keys[missing].unique()  # [N]
            row_bytes = sum(a.nbytes for a in cache.adapters) // cache.keys.shape[0]
            if (cache.keys.shape[0] + new_keys.shape[0]) * row_bytes > self.adapter_cache_bytes:
                cache = None
        if cache is None:
            keys_seen = keys.unique()  # [G]
            adapters = self.adapters(key_mask(keys_seen, self.num_experts, dtype))
        else:
            keys_seen, order = torch.cat([cache.keys, new_keys]).sort()  # [C + N]
            new = self.adapters(key_mask(new_keys, self.num_experts, dtype))
            adapters = tuple(torch.cat(pair)[order] for pair in zip(cache.adapters, new))
        self.__dict__["adapter_cache"] = AdapterCache(params, state, keys_seen, adapters)
        return torch.searchsorted(keys_seen, keys), adapters

    def adapter_state(self, dtype, device_type: str):
        """The parameters the adapters are generated from, and a tuple that changes with any of them (identity,
        storage, dtype, device, in-place version), with the copy a PEFT wrapper runs, and the dtype and autocast."""
        modules = (self.expert_embedding, self.embedding_process, _stack_module(self.generator))
        params = tuple(p for module in modules for p in module.parameters())
        autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
        tensors = tuple((id(p), p.data_ptr(), p.dtype, p.device, p._version) for p in params)
        return params, (dtype, autocast, *map(_peft_active_copy, modules), *tensors)


MAX_EXPERTS_KEYED = 62  # a selection set is cached under its bitmask of experts, an int64


def key_mask(keys, num_experts: int, dtype) -> torch.Tensor:
    """[G, E]: the selection of each bitmask in `keys` [G]."""
    return (keys[:, None] >> torch.arange(num_experts, device=keys.device) & 1).to(dtype)


def apply_adapters(x, set_of_token, adapters):
    """relu(x·W_down + b_down)·W_up + b_up [T, d], each token with the adapter `set_of_token` [T] picks among the G
    `adapters` (W_down [G, d, r], b_down [G, r], W_up [G, r, d], b_up [G, d]): tokens sorted by set, one grouped
    matmul per projection; with no more tokens than adapters (decoding from the cache), each token's own adapter
    gathered instead, since the grouped matmul visits every one of the G groups."""
    if x.shape[0] == 1:  # one decoding token: its adapter as views of the cached ones, nothing gathered
        w_down, b_down, w_up, b_up = (a[int(set_of_token)] for a in adapters)
        return torch.relu(x @ w_down + b_down) @ w_up + b_up
    if x.shape[0] <= adapters[0].shape[0]:
        return apply_token_adapters(x, tuple(a[set_of_token] for a in adapters))
    w_down, b_down, w_up, b_up = adapters
    group, order = set_of_token.sort(stable=True)  # [T], [T]
    ends = torch.bincount(set_of_token, minlength=w_down.shape[0]).cumsum(0).to(torch.int32)  # [G]
    hidden = torch.relu(grouped_matmul(x.index_select(0, order), w_down, ends) + b_down.index_select(0, group))
    output = grouped_matmul(hidden, w_up, ends) + b_up.index_select(0, group)  # [T, d], sorted by set
    return torch.empty_like(output).index_copy(0, order, output)


def apply_token_adapters(x, adapters):
    """relu(x·W_down + b_down)·W_up + b_up [T, d] with one adapter per token (W_down [T, d, r], b_down [T, r], W_up
    [T, r, d], b_up [T, d])."""
    w_down, b_down, w_up, b_up = adapters
    hidden = torch.relu(torch.bmm(x[:, None], w_down)[:, 0] + b_down)  # [T, r]
    return torch.bmm(hidden[:, None], w_up)[:, 0] + b_up


def grouped_matmul(x, weight, ends):
    """x [T, a], rows sorted by group, each times its group's weight [G, a, b] -> [T, b]; `ends` [G] (int32) is where
    each group's rows end. torch's grouped_mm (through transformers' dispatcher) for the dtypes it takes (not
    float64), else one matmul per group."""
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _grouped_mm(x, weight, ends)
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    return torch.cat([rows @ w for rows, w in zip(x.split(counts), weight.unbind())])


def _stack_module(generator) -> nn.Module:
    """The generator module: a model hands its layers a `_StackModule`, which looks the module up at every call."""
    return generator if isinstance(generator, nn.Module) else generator.modules[generator.stack]


def _peft_active_copy(module: nn.Module):
    """Which copy a PEFT `modules_to_save` wrapper runs (it switches copies without touching a parameter), or None."""
    if "original_module" not in module._modules:
        return None
    return module.disable_adapters, tuple(module.active_adapters)


def noisy_top_k_balance_loss(clean, noisy, noise_scale, probs, index, weights, token_mask=None) -> torch.Tensor:
    """CV²(importance) + CV²(load) over the non-padding tokens (official GPT-2 variant, docs/hypermoe.md §6, item 7):
    importance sums each expert's combine weights; load is the smooth estimate of Shazeer et al. (2017) in training
    (k < E), and the number of tokens routed to each expert otherwise."""
    real = torch.ones_like(probs[:, 0], dtype=torch.bool) if token_mask is None else token_mask  # [T]
    gates = torch.zeros_like(probs).scatter(1, index, weights.to(probs.dtype))  # [T, E]
    importance = torch.where(real[:, None], gates, 0).sum(0)  # [E]
    top_k = index.shape[1]
    if noise_scale is None or top_k == probs.shape[1]:
        load = torch.where(real[:, None], gates > 0, False).sum(0).to(probs.dtype)
    else:
        load = torch.where(real[:, None], prob_in_top_k(clean, noisy, noise_scale, probs, top_k), 0).sum(0)
    return cv_squared(importance) + cv_squared(load)


def prob_in_top_k(clean, noisy, noise_scale, probs, top_k: int) -> torch.Tensor:
    """[T, E]: probability that each expert is in the top k once its noise is redrawn (official `_prob_in_top_k`).
    As the official call passes them, the thresholds are the (k+1)-th and k-th largest softmax probabilities of the
    noisy logits, compared with logits (docs/hypermoe.md §6, item 7)."""
    top = probs.topk(top_k + 1, dim=-1).values  # [T, k+1]
    threshold_if_in, threshold_if_out = top[:, top_k:], top[:, top_k - 1 : top_k]  # [T, 1] each
    return torch.where(
        noisy > threshold_if_in,
        torch.special.ndtr((clean - threshold_if_in) / noise_scale),
        torch.special.ndtr((clean - threshold_if_out) / noise_scale),
    )


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var/mean² (unbiased variance, 1e-10 floor; official `cv_squared`)."""
    if values.shape[0] == 1:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + 1e-10)


def _gpt2_generic_init(modules, std: float):
    """GPT-2's `_init_weights` on Linear and Embedding layers: weight N(0, std), bias 0
    (docs/hypermoe.md §6, item 5)."""
    for module in modules:
        init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear):
            init.zeros_(module.bias)


def _torch_default_linear_init(linear: nn.Linear):
    """PyTorch's own nn.Linear init (the official code's), through transformers' skip-if-loaded init functions."""
    init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(linear.in_features)
    init.uniform_(linear.bias, -bound, bound)


@torch.no_grad()
def zero_hyper_expert(module: nn.Module):
    """Make the HyperExpert add exactly 0 until trained while every generator head still learns: only the
    up-projection heads (W_up, b_up) are zeroed, so the output is 0 and they get gradient from the non-zero hidden
    activations; zeroing the down-projection too would leave ReLU(0) in between, whose zero derivative would stop
    W_down, b_down and W_up from ever training (docs/upcycling.md §3)."""
    if isinstance(module, HyperExpertGenerator):
        for head in (module.weight_up, module.bias_up):
            init.zeros_(head.weight)
            init.zeros_(head.bias)


def _upcycling_departure(config, zeroed: bool) -> str | None:
    if zeroed:
        return None
    if config.hyper_init == "normal":
        return "HyperMoE adds a generated adapter drawn at N(0, initializer_range) (hyper_init='normal'; " \
            "zero_hyper_expert=True removes it)"
    return "HyperMoE adds a tiny generated adapter (about 1e-3 relative; zero_hyper_expert=True removes it)"


FAMILY = MoeFamily(
    config_class=HyperMoeConfig,
    layer_class=HyperMoeLayer,
    stack_module=HyperExpertGenerator,  # one generator per stack (docs/hypermoe.md §2)
    init_modules=(Router, NoisyTopKRouter, HyperMoeLayer, HyperExpertGenerator),
    peft_modules_to_save=(
        "router", "expert_embedding", "embedding_process", "hyper_generators.encoder", "hyper_generators.decoder",
    ),
    upcycling_departure=_upcycling_departure,
    zero_added_output=zero_hyper_expert,
    moe_sources=("mixtral", "switch_transformers"),
)
