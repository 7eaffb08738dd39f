"""The family registry: one line per family, and the record (`MoeFamily`) each family's file defines next to its layer.

Everything outside a family's own file learns about the family here, so adding a family is its file plus one line
in `REGISTRY` (docs/README.md, "Adding a family"). This module imports neither torch nor transformers: the command
line lists the families before loading them.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass

REGISTRY = {
    # model type: (class-name prefix, the module whose `FAMILY` is the family's record, relative to this package)
    "topk_moe": ("TopKMoe", ".topk_moe"),
    "hypermoe": ("HyperMoe", ".hypermoe"),
    "hyperrouter": ("HyperRouter", ".hyperrouter"),
    "mh_moe": ("MultiHeadMoe", ".mh_moe"),
    "dynamic_moe": ("DynamicMoe", ".dynamic_moe"),
}


def _exact(config, zeroed: bool) -> str | None:
    return None


@dataclass(frozen=True)
class MoeFamily:
    """What makes a family a family.

    Args:
        config_class: its config (`config_class.model_type` is the family's name).
        layer_class: the MoE layer that replaces each chosen FFN, built as `layer_class(config, ffn, layer_idx)`.
        stack_module: a module the model builds once per stack as `stack_module(config, hidden_size, num_layers)`
            and passes to each layer of the stack as a fourth argument (HyperMoE's generator), or None.
        init_modules: module classes whose `reset_parameters` re-initialises their own parameters after the
            backbone's generic initialisation (and when a conversion creates them).
        peft_modules_to_save: names of modules PEFT trains in full next to the adapters (small, new at upcycling).
        experts_from_dense_ffn: whether upcycling copies the dense FFN into every expert (MH-MoE's sub-token experts
            cannot be copies).
        upcycling_departure: `(config, zeroed) -> reason or None`: why an upcycled model does not compute the dense
            function at step 0 (`zeroed`: `zero_added_output` was applied).
        zero_added_output: `(module) -> None`, applied to every new module of a conversion that asks for it, so that
            what the family adds to the experts' output starts at exactly zero (HyperMoE's HyperExpert), or None.
        moe_sources: transformers MoE model types whose trained routers and experts convert into this family.
        moe_source_refusal: why other MoE models do not convert into it.
    """

    config_class: type
    layer_class: type
    stack_module: type | None = None
    init_modules: tuple[type, ...] = ()
    peft_modules_to_save: tuple[str, ...] = ()
    experts_from_dense_ffn: bool = True
    upcycling_departure: Callable[[object, bool], str | None] = _exact
    zero_added_output: Callable[[object], None] | None = None
    moe_sources: tuple[str, ...] = ()
    moe_source_refusal: str = "no converter maps an existing MoE onto it"

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    @property
    def class_prefix(self) -> str:
        return REGISTRY[self.model_type][0]


def check_family(model_type: str) -> str:
    """`model_type` if it names a registered family; otherwise a ValueError listing the families."""
    if model_type not in REGISTRY:
        raise ValueError(f"Unknown family {model_type!r}; hf-moe families are {', '.join(REGISTRY)}.")
    return model_type


def get_family(model_type: str) -> MoeFamily:
    """The record of the family `model_type` (imports its module)."""
    module = importlib.import_module(REGISTRY[check_family(model_type)][1], __package__)
    family = module.FAMILY
    if family.model_type != model_type:
        raise ValueError(f"{module.__name__}.FAMILY is {family.model_type!r}, registered as {model_type!r}.")
    return family


def all_families() -> dict[str, MoeFamily]:
    """Every registered family, by model type, in registry order."""
    return {model_type: get_family(model_type) for model_type in REGISTRY}


__all__ = ["REGISTRY", "MoeFamily", "all_families", "check_family", "get_family"]
