"""Self-contained modeling code (imports only torch, transformers and sibling files) that checkpoints can carry."""

from .backbones import ADAPTERS, BackboneAdapter, get_adapter
from .configuration_hf_moe import (
    DynamicMoeConfig,
    HyperMoeConfig,
    HyperRouterConfig,
    MoeConfig,
    MultiHeadMoeConfig,
    TopKMoeConfig,
)
from .dynamic_moe import DynamicMoeLayer
from .experts import BiasedExperts, FfnSpec, GatedExperts, PlainExperts, SortedLoopExperts, build_experts
from .hypermoe import HyperExpertGenerator, HyperMoeLayer
from .hyperrouter import HyperRouterGate, HyperRouterLayer
from .mh_moe import MultiHeadMoeLayer, mh_moe_matched_sizes
from .modeling_families import MODEL_CLASSES
from .modeling_hf_moe import HEADS, MoeFeedForward, MoePreTrainedModel
from .registry import REGISTRY, MoeFamily, all_families, check_family, get_family
from .topk_moe import MoeLayerOutput, Router, TopKMoeLayer
