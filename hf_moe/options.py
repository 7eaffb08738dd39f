"""The MoE options shared by `hf-moe upcycle`, the quickstart and the examples: `MoeArguments` and its argparse group.

Standard library only, so that `hf-moe --help` and argument errors answer before torch and transformers load.

    parser = argparse.ArgumentParser()
    add_moe_arguments(parser)          # --family, --num-experts, --top-k, --router-top-p, ..., --set FIELD=VALUE
    moe = moe_arguments(parser.parse_args())
    upcycle_model(model, moe.family, **moe.upcycle_kwargs())
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DISTRIBUTED_SIZES", "MoeArguments", "add_distributed_arguments", "add_expert_count_arguments",
           "add_moe_arguments", "distributed_sizes", "moe_arguments", "parse_bool", "parse_field", "parse_int_list"]

BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


@dataclass
class MoeArguments:
    """The MoE a dense checkpoint is upcycled into (HfArgumentParser style: each field's help in its metadata)."""

    family: str | None = field(default=None, metadata={"help": "hf-moe model type; None for the dense baseline"})
    num_experts: int = field(default=8, metadata={"help": "experts per MoE layer"})
    top_k: int = field(default=2, metadata={"help": "experts per token (num_experts_per_tok)"})
    router_top_p: float | None = field(default=None, metadata={"help": "dynamic_moe threshold p"})
    moe_layers: list[int] | None = field(default=None, metadata={"help": "layer indices made MoE (default: all)"})
    moe_layer_frequency: int | None = field(default=None, metadata={"help": "every n-th layer becomes MoE"})
    moe_num_heads: int | None = field(default=None, metadata={"help": "mh_moe sub-tokens per token"})
    norm_topk_prob: bool | None = field(
        default=None, metadata={"help": "renormalise the selected experts' weights (default: the family's)"})
    config_overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "any other config field of the family"})

    def config_fields(self) -> dict[str, Any]:
        """The family config fields set here beyond the MoE size: the optional fields given, then the overrides."""
        optional = {"router_top_p": self.router_top_p, "moe_layer_frequency": self.moe_layer_frequency,
                    "moe_num_heads": self.moe_num_heads, "norm_topk_prob": self.norm_topk_prob}
        return {**{name: value for name, value in optional.items() if value is not None}, **self.config_overrides}

    def upcycle_kwargs(self) -> dict[str, Any]:
        """The keywords of `upcycle` and `upcycle_model` after the family: MoE size, MoE layers and config fields."""
        return dict(num_experts=self.num_experts, num_experts_per_tok=self.top_k, moe_layers=self.moe_layers,
                    **self.config_fields())


def _help(name: str) -> str:
    return MoeArguments.__dataclass_fields__[name].metadata["help"]


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off or 1/0 (any case) as a bool."""
    try:
        return BOOLEANS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false (or yes/no, on/off, 1/0), got {text!r}") from None


def parse_int_list(text: str) -> list[int]:
    """Comma-separated integers as a list."""
    return [int(part) for part in text.split(",") if part.strip()]


def parse_field(text: str) -> tuple[str, Any]:
    """FIELD=VALUE as (FIELD, VALUE), the value parsed as JSON where it is JSON and kept as text otherwise."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects FIELD=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def add_expert_count_arguments(parser) -> None:
    """--num-experts and --top-k, on `parser` or an argument group."""
    parser.add_argument("--num-experts", type=int, default=MoeArguments.num_experts,
                        help=f"{_help('num_experts')} (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=MoeArguments.top_k, help=f"{_help('top_k')} (default %(default)s)")


def add_moe_arguments(parser: argparse.ArgumentParser, *, families=None, family_required: bool = False,
                      family_help: str = "hf-moe model type; omit for the dense baseline") -> argparse._ArgumentGroup:
    """The group of every `MoeArguments` option: --family (`families`: its choices), the expert counts, the MoE
    layers and the family config fields (--set FIELD=VALUE for any other)."""
    group = parser.add_argument_group("MoE options", "the MoE the dense checkpoint is upcycled into")
    group.add_argument("--family", required=family_required, choices=families, help=family_help)
    add_expert_count_arguments(group)
    group.add_argument("--router-top-p", type=float, help=_help("router_top_p"))
    group.add_argument("--moe-layers", type=parse_int_list,
                       help="comma-separated layer indices made MoE (default: all)")
    group.add_argument("--moe-layer-frequency", type=int, help=_help("moe_layer_frequency"))
    group.add_argument("--moe-num-heads", type=int, help=_help("moe_num_heads"))
    group.add_argument("--norm-topk-prob", type=parse_bool, metavar="{true,false}", help=_help("norm_topk_prob"))
    group.add_argument("--set", type=parse_field, action="append", default=[], metavar="FIELD=VALUE",
                       help=f"{_help('config_overrides')} (value parsed as JSON)")
    return group


DISTRIBUTED_SIZES = {
    "tp_size": "tensor parallel: each process a slice of every attention and expert weight",
    "ep_size": "expert parallel: each process whole experts, tokens exchanged between processes",
    "fsdp_size": "FSDP: each process a shard of every weight and its own batch",
}


def add_distributed_arguments(parser) -> None:
    """--tp-size, --ep-size and --fsdp-size: transformers' distributed engine (`DistributedConfig`) under torchrun."""
    group = parser.add_argument_group(
        "distributed engine", "shard an hf-moe checkpoint over the processes of torchrun (README, Scaling out)")
    for name, what in DISTRIBUTED_SIZES.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=int, default=1, help=f"{what} (default %(default)s)")


def distributed_sizes(args: argparse.Namespace) -> dict[str, int] | None:
    """The `DistributedConfig` sizes of a namespace parsed with `add_distributed_arguments`; None if all are 1."""
    sizes = {name: getattr(args, name) for name in DISTRIBUTED_SIZES}
    return sizes if any(size > 1 for size in sizes.values()) else None


def moe_arguments(args: argparse.Namespace) -> MoeArguments:
    """The `MoeArguments` of a namespace parsed with `add_moe_arguments`."""
    return MoeArguments(
        family=args.family,
        num_experts=args.num_experts,
        top_k=args.top_k,
        router_top_p=args.router_top_p,
        moe_layers=args.moe_layers,
        moe_layer_frequency=args.moe_layer_frequency,
        moe_num_heads=args.moe_num_heads,
        norm_topk_prob=args.norm_topk_prob,
        config_overrides=dict(args.set),
    )
