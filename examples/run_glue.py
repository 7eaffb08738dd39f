"""Fine-tune a dense checkpoint or its upcycled MoE on a GLUE/SuperGLUE task (thin wrapper over
`hf_moe.training.finetune.finetune`).

    python examples/run_glue.py --model sentence-transformers/all-MiniLM-L6-v2 --task rte --family hypermoe \
        --data-dir ../shared/data --output-dir runs/rte-hypermoe --epochs 3
    python -m torch.distributed.run --nproc_per_node 2 examples/run_glue.py ... --checksum-file sums.json  # CPU, gloo
    python -m torch.distributed.run --nproc_per_node 2 examples/run_glue.py --model ./my-hf-moe-bert --task rte \
        --ep-size 2 --fsdp-size 2 ...  # an hf-moe checkpoint sharded: half the experts per process

Prints the result dict as JSON (rank 0); `--checksum-file` writes every rank's parameter checksum to
`<file>.rank<N>`.
"""

import argparse
import dataclasses
import json
import os
import sys

from hf_moe.options import add_distributed_arguments, add_moe_arguments, distributed_sizes, moe_arguments
from hf_moe.training.finetune import finetune


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="dense checkpoint folder or Hub id")
    p.add_argument("--task", required=True, help="task name (hf_moe.tasks.TASKS)")
    p.add_argument("--data-dir", help="local GLUE/SuperGLUE folder (default $HF_MOE_DATA_DIR, else the Hub)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peft", choices=["lora"])
    p.add_argument("--no-telemetry", action="store_true")
    p.add_argument("--save-model", action="store_true", help="save the trained model and tokenizer in --output-dir")
    p.add_argument("--checksum-file", help="write this rank's parameter sha256 to FILE.rank<RANK>")
    add_moe_arguments(p)
    add_distributed_arguments(p)
    args = p.parse_args(argv)
    try:
        result = finetune(
            args.model, args.task, data_dir=args.data_dir, output_dir=args.output_dir,
            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, epochs=args.epochs,
            max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
            seed=args.seed, peft=args.peft, telemetry=not args.no_telemetry, checksum=bool(args.checksum_file),
            save_model=args.save_model, distributed=distributed_sizes(args), **dataclasses.asdict(moe_arguments(args)),
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"run_glue.py: error: {error}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", 0))
    if args.checksum_file:
        with open(f"{args.checksum_file}.rank{rank}", "w") as f:
            json.dump({"rank": rank, "param_sha256": result["param_sha256"], "global_step": result["global_step"]}, f)
    if rank == 0:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
