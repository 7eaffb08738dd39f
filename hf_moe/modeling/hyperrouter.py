"""HyperRouter (Do et al., EMNLP 2023; official code giangdip2410/HyperRouter `custom_gate.py`): a frozen random
hypernetwork generates each layer's router weight and bias from a small trainable embedding (docs/hyperrouter.md §2).

Departures from the official code: the hypernetwork is held as buffers saved with the model (so the router is
reproducible without RNG state, and no loader, optimizer or PEFT wrapper can make it trainable), and k is fixed unless
a training callback changes it. `router_dense_uniform` gives the official dense evaluation (docs/hyperrouter.md §6).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_hf_moe import HyperRouterConfig
from .registry import MoeFamily
from .topk_moe import TopKMoeLayer


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
    """theta = Lin(d->H) -> ReLU -> Lin(H->E*(d+1)) of the embedding e; W_r = theta[:, :d], b_r = theta[:, d].

    At inference theta is generated once and kept (`router_cache`, not saved) while e and the hypernetwork are
    unchanged: at decoding, regenerating it read the hypernetwork's E*(d+1) x H matrix at every step.
    """

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

    @torch.no_grad()
    def init_trainable(self, std: float, generator: torch.Generator | None = None):
        """Draw the trainable embedding e from N(0, std): with the hypernetwork's zero biases the generated router
        scales with e, and std = 0 gives a zero router (upcycling's `router_init`, docs/upcycling.md §2)."""
        self.router_embedding.normal_(0.0, std, generator=generator) if std else self.router_embedding.zero_()

    def forward(self, x):
        # W_r depends on no input, only on e (d numbers per layer receive gradient): generated per forward in
        # training (and while compiling), once per state of e and the hypernetwork at inference
        dtype = x.dtype  # the layer casts x to `router_dtype` (docs/hyperrouter.md §6, item 4)
        generate = self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()
        theta = self.generated_router(dtype) if generate else self.cached_router(dtype)
        return F.linear(x.to(dtype), theta[:, :-1], theta[:, -1])  # [T, E]

    def generated_router(self, dtype):
        return self.hypernet(self.router_embedding).to(dtype).view(self.num_experts, -1)  # [E, d+1]

    def cached_router(self, dtype):
        tensors = (self.router_embedding, *self.hypernet.buffers())
        device_type = self.router_embedding.device.type
        autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
        # identity, storage, dtype, device and in-place version of every input, and the output dtype and autocast
        state = (dtype, autocast, *((id(t), t.data_ptr(), t.dtype, t.device, t._version) for t in tensors))
        cache = self.__dict__.get("router_cache")
        if cache is None or cache[0] != state:
            cache = (state, tensors, self.generated_router(dtype))  # tensors held so that their ids stay theirs
            self.__dict__["router_cache"] = cache
        return cache[2]

    def train(self, mode: bool = True):
        """Also drops the router cache: `train()`/`eval()` refresh it after edits no version counter sees (`.data`)."""
        self.__dict__["router_cache"] = None
        return super().train(mode)

    def __getstate__(self):
        """Pickling and `deepcopy` leave the router cache behind."""
        return {**super().__getstate__(), "router_cache": None}


class HyperRouterLayer(TopKMoeLayer):
    """Top-k on the generated logits, softmax over the k selected (= renormalised top-k of the full softmax)."""

    def build_router(self, config, hidden_size: int) -> nn.Module:
        return HyperRouterGate(config, hidden_size)

    def select(self, probs):
        """Top-k, or with `router_dense_uniform` every expert at weight 1/E: the official dense evaluation replaces
        the logits by ones and sets top_k = E (docs/hyperrouter.md §6, item 3)."""
        if not self.config.router_dense_uniform:
            return super().select(probs)
        num_tokens = probs.shape[0]
        index = torch.arange(self.num_experts, device=probs.device).expand(num_tokens, -1)  # [T, E]
        return index, probs.new_full((num_tokens, self.num_experts), 1 / self.num_experts)  # [T, E], [T, E]


FAMILY = MoeFamily(
    config_class=HyperRouterConfig,
    layer_class=HyperRouterLayer,
    init_modules=(HyperRouterGate,),
    peft_modules_to_save=("router",),
    moe_source_refusal="HyperRouter generates every router from a frozen hypernetwork and a layer embedding, so the "
    "source's trained router weights cannot be reused",
)
