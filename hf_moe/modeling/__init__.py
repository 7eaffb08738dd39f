"""Self-contained modeling code (imports only torch, transformers and sibling files) that checkpoints can carry."""

from .configuration_hf_moe import (
    DynamicMoeConfig,
    HyperMoeConfig,
    HyperRouterConfig,
    MoeConfig,
    MultiHeadMoeConfig,
    TopKMoeConfig,
)
from .experts import BiasedExperts, FfnSpec, GatedExperts, PlainExperts, SortedLoopExperts, build_experts
from .moe_dynamic import DynamicMoeLayer
from .moe_hypermoe import HyperExpertGenerator, HyperMoeLayer
from .moe_hyperrouter import HyperRouterGate, HyperRouterLayer
from .moe_mh import MultiHeadMoeLayer, mh_moe_matched_sizes
from .moe_topk import MoeLayerOutput, Router, TopKMoeLayer
from .backbones import ADAPTERS, BackboneAdapter, get_adapter
from .modeling_hf_moe import (
    CUSTOM_INIT_MODULES,
    FAMILIES,
    FAMILY_BY_MODEL_TYPE,
    FAMILY_CONFIG_CLASSES,
    HEADS,
    MoeFeedForward,
    MoePreTrainedModel,
)
from .modeling_families import MODEL_CLASSES
