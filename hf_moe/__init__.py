"""hf-moe: HyperMoE, HyperRouter, MH-MoE and dynamic top-p routing as transformers model families.

Importing the package registers every family's config with `AutoConfig` and every head with its `AutoModel...` class.
"""

from transformers import AutoConfig

from .modeling import (
    ADAPTERS,
    HEADS,
    MODEL_CLASSES,
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
    MoePreTrainedModel,
    MultiHeadMoeConfig,
    MultiHeadMoeLayer,
    TopKMoeConfig,
    TopKMoeLayer,
    mh_moe_matched_sizes,
)
from .modeling import modeling_hf_moe as _modeling

__version__ = "0.1.0"

FAMILY_CONFIGS = (TopKMoeConfig, HyperMoeConfig, HyperRouterConfig, MultiHeadMoeConfig, DynamicMoeConfig)
FAMILY_NAMES = _modeling.FAMILY_BY_MODEL_TYPE  # model type -> class-name prefix

for _config_class in FAMILY_CONFIGS:
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
for (_family, _head), _model_class in MODEL_CLASSES.items():
    HEADS[_head].register(_model_class.config_class, _model_class, exist_ok=True)
    globals()[_model_class.__name__] = _model_class
