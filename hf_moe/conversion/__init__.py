"""Conversion into hf-moe families: sparse upcycling of dense checkpoints."""

from .from_moe import convert_moe, convert_moe_model
from .structure import build_moe_config
from .upcycle import UpcycleOptions, upcycle, upcycle_model

__all__ = ["UpcycleOptions", "build_moe_config", "convert_moe", "convert_moe_model", "upcycle", "upcycle_model"]
