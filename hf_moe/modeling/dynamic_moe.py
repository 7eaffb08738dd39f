"""Dynamic top-p routing (Huang et al., "Harder Tasks Need More Experts", ACL 2024; official inference code
ZhenweiAn/Dynamic_MoE `top_p_sampling_batched_all_sequence`), docs/dynamic.md §2.

Departure from the official code: softmax, sort and cumsum run in float32 (the code uses the model dtype, and bf16
cumsums can flip the set at the threshold; `router_dtype="model"` reproduces it). Training losses follow the paper:
balance counting every selected expert (1e-2) and router entropy (1e-4).
"""

from .configuration_hf_moe import DynamicMoeConfig
from .registry import MoeFamily
from .routing import top_p_routing
from .topk_moe import Router, TopKMoeLayer


class DynamicMoeLayer(TopKMoeLayer):
    """Each token takes the shortest prefix of experts whose probability exceeds `router_top_p`, padded to the
    batch's widest selection with sentinel slots (index = num_experts, weight 0). Router statistics (balance over
    every selected expert, entropy, mean experts per token) come from the base layer."""

    def select(self, probs):
        config = self.config
        if config.router_dtype == "model":  # official: sort and cumsum in the model dtype (docs/dynamic.md §6, item 1)
            probs = probs.to(self.router.weight.dtype)
        return top_p_routing(probs, config.router_top_p, config.router_max_experts, bool(config.norm_topk_prob))


FAMILY = MoeFamily(
    config_class=DynamicMoeConfig,
    layer_class=DynamicMoeLayer,
    init_modules=(Router,),
    peft_modules_to_save=("router",),
    moe_sources=("mixtral",),
    moe_source_refusal="dynamic top-p routing is offered for Mixtral sources only",
)
