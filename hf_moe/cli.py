"""The `hf-moe` command (also `python -m hf_moe`): `upcycle`, `quickstart` and `smoke`.

Arguments are parsed before torch and transformers load (seconds), so `--help` and argument errors answer at once;
each command imports what it needs. Bad input ends in one line on stderr and exit status 2, Ctrl-C in one line and 130.
"""

import argparse
import sys

from . import FAMILY_NAMES, quickstart
from .options import add_moe_arguments, moe_arguments


def upcycle(args) -> int:
    import logging

    from transformers.utils.hub import convert_file_size_to_int

    from .conversion import UpcycleOptions, upcycle

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    moe = moe_arguments(args)
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
            moe.family,
            options=options,
            overwrite=args.overwrite,
            verify=args.verify,
            max_shard_size=convert_file_size_to_int(args.max_shard_size),
            revision=args.revision,
            gguf_file=args.gguf_file,
            **moe.upcycle_kwargs(),
        )
    except (OSError, ValueError) as error:  # user problems: bad source or options, target exists, disk full, ...
        print(f"hf-moe upcycle: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


SMOKE_BACKBONE = {"model_type": "bert", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 512,
                  "num_hidden_layers": 4, "num_attention_heads": 4}


def smoke(args) -> int:
    """Every family over a small random BERT: one labelled batch forward and backward, a line per family."""
    import time

    import torch

    from .modeling import MODEL_CLASSES, all_families

    torch.manual_seed(0)
    input_ids = torch.randint(0, SMOKE_BACKBONE["vocab_size"], (8, 32))
    labels = torch.randint(0, 2, (8,))
    print(f"{'family':<14}{'params':>10}{'expert params':>15}{'loss':>9}{'aux loss':>10}{'ms/step':>9}")
    for family in all_families().values():
        config = family.config_class(text_config=SMOKE_BACKBONE, num_experts=8, num_experts_per_tok=2, num_labels=2)
        model = MODEL_CLASSES[family.class_prefix, "ForSequenceClassification"](config)
        start = time.perf_counter()
        output = model(input_ids=input_ids, labels=labels)
        output.loss.backward()
        elapsed = (time.perf_counter() - start) * 1000
        params = sum(p.numel() for p in model.parameters())
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        print(
            f"{config.model_type:<14}{params:>10,}{expert_params:>15,}"
            f"{output.loss.item():>9.4f}{output.aux_loss.item():>10.4f}{elapsed:>9.0f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe", description="Mixture-of-experts families for transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="`hf-moe COMMAND --help` gives its options")

    up = commands.add_parser("upcycle", help="turn a dense checkpoint into an MoE of any family")
    up.set_defaults(run=upcycle)
    up.add_argument("source", help="local checkpoint folder or Hub model id")
    up.add_argument("output", help="output folder (must not exist unless --overwrite)")
    add_moe_arguments(up, families=sorted(FAMILY_NAMES), family_required=True, family_help="model type")
    up.add_argument("--expert-noise-std", type=float, default=0.0, help="noise on expert copies, relative to std")
    up.add_argument("--reinit-fraction", type=float, default=0.0, help="Drop-Upcycling: neurons re-initialised")
    up.add_argument("--router-init", choices=["normal", "zeros"], default="normal",
                    help="router weights at step 0 (default normal)")
    up.add_argument("--router-init-std", type=float,
                    help="std of the normal router init (default: the config's initializer_range)")
    up.add_argument("--zero-hyper-expert", action="store_true", help="hypermoe: start the HyperExpert at exactly 0")
    up.add_argument("--seed", type=int, default=0, help="seed of the router init, noise and re-initialisation")
    up.add_argument("--gguf-file", help="GGUF file inside SOURCE, loaded through transformers")
    up.add_argument("--revision", help="Hub revision of SOURCE")
    up.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 500MB (default 2GB)")
    up.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    up.add_argument("--verify", action="store_true", help="compare source and result on sample inputs")

    qs = commands.add_parser("quickstart", help="MiniLM dense vs every family, fine-tuned on SST-2 (a table)")
    qs.set_defaults(run=lambda args: quickstart.main(args=args))
    quickstart.build_parser(qs)

    sm = commands.add_parser("smoke", help="every family on a small random BERT, no download (seconds)")
    sm.set_defaults(run=smoke)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"hf-moe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
