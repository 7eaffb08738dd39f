"""hf-moe: HyperMoE, HyperRouter, MH-MoE and dynamic top-p routing as transformers model families.

Importing the package registers every family's config with `AutoConfig`.
"""

from transformers import AutoConfig

from .modeling import (
    DynamicMoeConfig,
    DynamicMoeLayer,
    FfnSpec,
    HyperExpertGenerator,
    HyperMoeConfig,
    HyperMoeLayer,
    HyperRouterConfig,
    HyperRouterLayer,
    MoeConfig,
    MoeLayerOutput,
    MultiHeadMoeConfig,
    MultiHeadMoeLayer,
    TopKMoeConfig,
    TopKMoeLayer,
    mh_moe_matched_sizes,
)

__version__ = "0.1.0"

FAMILY_CONFIGS = (TopKMoeConfig, HyperMoeConfig, HyperRouterConfig, MultiHeadMoeConfig, DynamicMoeConfig)

for _config_class in FAMILY_CONFIGS:
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
