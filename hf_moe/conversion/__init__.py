"""Conversion into hf-moe families: sparse upcycling of dense checkpoints."""

from .from_moe import convert_moe, convert_moe_model
from .upcycle import UpcycleOptions, build_moe_config, upcycle, upcycle_model

__all__ = ["UpcycleOptions", "build_moe_config", "convert_moe", "convert_moe_model", "upcycle", "upcycle_model"]
