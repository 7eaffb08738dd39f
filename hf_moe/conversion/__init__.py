"""Conversion into hf-moe families: sparse upcycling of dense checkpoints."""

from .upcycle import UpcycleOptions, build_moe_config, upcycle, upcycle_model

__all__ = ["UpcycleOptions", "build_moe_config", "upcycle", "upcycle_model"]
