"""The `hf-moe` command: `hf-moe upcycle SOURCE OUTPUT --family NAME ...` and `hf-moe quickstart`."""

import argparse
import json
import logging
import sys

from transformers.utils.hub import convert_file_size_to_int

from . import quickstart
from .conversion import UpcycleOptions, upcycle
from .modeling import FAMILY_CONFIG_CLASSES


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _field(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects FIELD=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe", description="Mixture-of-experts families for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("upcycle", help="turn a dense checkpoint into an MoE of any family")
    up.add_argument("source", help="local checkpoint folder or Hub model id")
    up.add_argument("output", help="output folder (must not exist unless --overwrite)")
    up.add_argument("--family", required=True, choices=sorted(FAMILY_CONFIG_CLASSES), help="model type")
    up.add_argument("--num-experts", type=int, default=8)
    up.add_argument("--top-k", type=int, default=2, help="experts per token (num_experts_per_tok)")
    up.add_argument("--router-top-p", type=float, help="dynamic_moe threshold p")
    up.add_argument("--moe-layers", type=_int_list, help="comma-separated layer indices (default: all)")
    up.add_argument("--moe-layer-frequency", type=int, help="every n-th layer becomes MoE")
    up.add_argument("--moe-num-heads", type=int, help="mh_moe sub-tokens per token")
    up.add_argument("--norm-topk-prob", type=json.loads, choices=[True, False], help="true or false")
    up.add_argument("--set", type=_field, action="append", default=[], metavar="FIELD=VALUE",
                    help="any other config field of the family (value parsed as JSON)")
    up.add_argument("--expert-noise-std", type=float, default=0.0, help="noise on expert copies, relative to std")
    up.add_argument("--reinit-fraction", type=float, default=0.0, help="Drop-Upcycling: neurons re-initialised")
    up.add_argument("--router-init", choices=["normal", "zeros"], default="normal")
    up.add_argument("--router-init-std", type=float)
    up.add_argument("--zero-hyper-expert", action="store_true", help="hypermoe: start the HyperExpert at exactly 0")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--gguf-file", help="GGUF file inside SOURCE, loaded through transformers")
    up.add_argument("--revision", help="Hub revision of SOURCE")
    up.add_argument("--max-shard-size", default="2GB")
    up.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    up.add_argument("--verify", action="store_true", help="compare source and result on sample inputs")

    qs = commands.add_parser("quickstart", help="MiniLM dense vs every family, fine-tuned on SST-2 (a table)")
    quickstart.build_parser(qs)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "quickstart":
        return quickstart.main(args=args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    family_options = {
        name: value
        for name, value in [
            ("router_top_p", args.router_top_p),
            ("moe_layer_frequency", args.moe_layer_frequency),
            ("moe_num_heads", args.moe_num_heads),
            ("norm_topk_prob", args.norm_topk_prob),
        ]
        if value is not None
    }
    family_options.update(dict(args.set))
    try:
        options = UpcycleOptions(
            expert_noise_std=args.expert_noise_std,
            reinit_fraction=args.reinit_fraction,
            router_init=args.router_init,
            router_init_std=args.router_init_std,
            zero_hyper_expert=args.zero_hyper_expert,
            seed=args.seed,
        )
        path = upcycle(
            args.source,
            args.output,
            args.family,
            num_experts=args.num_experts,
            num_experts_per_tok=args.top_k,
            moe_layers=args.moe_layers,
            options=options,
            overwrite=args.overwrite,
            verify=args.verify,
            max_shard_size=convert_file_size_to_int(args.max_shard_size),
            revision=args.revision,
            gguf_file=args.gguf_file,
            **family_options,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"hf-moe upcycle: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
