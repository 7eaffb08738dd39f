"""Causal-LM training (or continued pre-training) of a decoder family on a local text file, with `Trainer`.

    python examples/run_clm.py --model ./my-llama --family topk_moe --train-file corpus.txt --output-dir runs/clm
    python examples/run_clm.py --model ./my-hf-moe-llama --train-file corpus.txt --output-dir runs/clm  # continue
    python -m torch.distributed.run --nproc_per_node 2 examples/run_clm.py --model ./my-hf-moe-llama \
        --train-file corpus.txt --output-dir runs/clm --ep-size 2 --fsdp-size 2  # sharded over 2 processes

The file is read as plain text (one document per line), tokenised, concatenated and cut into `--block-size` blocks
(the last partial block dropped); 5% of blocks (at least one) are held out for the eval loss / perplexity. Tiny
defaults (block 128, 20 steps) so it runs on a CPU in minutes.
"""

import argparse
import json
import math
import sys

import torch
from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.distributed import DistributedConfig

import hf_moe  # noqa: F401
from hf_moe.conversion import UpcycleOptions, upcycle_model
from hf_moe.options import add_distributed_arguments, add_moe_arguments, distributed_sizes, moe_arguments
from hf_moe.training import RouterTelemetryCallback


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="dense decoder checkpoint, or an hf-moe causal checkpoint")
    p.add_argument("--train-file", required=True, help="local text file")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-model", action="store_true")
    add_moe_arguments(p, family_help="upcycle the dense checkpoint into this family first")
    add_distributed_arguments(p)
    args = p.parse_args(argv)
    moe = moe_arguments(args)
    sizes = distributed_sizes(args)
    if sizes and moe.family:
        p.error("--tp-size/--ep-size/--fsdp-size shard an hf-moe checkpoint: upcycle first (hf-moe upcycle), then "
                "pass that checkpoint without --family")

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    distributed = {"distributed_config": DistributedConfig(**sizes)} if sizes else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **distributed)
    if moe.family:
        model = upcycle_model(model, moe.family, options=UpcycleOptions(seed=args.seed), **moe.upcycle_kwargs())
    is_moe = hasattr(model, "moe_blocks")

    raw = load_dataset("text", data_files={"train": args.train_file})["train"]
    tokenized = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    block = args.block_size

    def group(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        n = len(ids) // block * block
        return {"input_ids": [ids[i:i + block] for i in range(0, n, block)]}

    blocks = tokenized.map(group, batched=True, remove_columns=tokenized.column_names)
    if len(blocks) < 2:
        raise SystemExit(f"{args.train_file}: fewer than 2 blocks of {block} tokens; use a smaller --block-size")
    split = blocks.train_test_split(test_size=max(1, len(blocks) // 20), seed=args.seed)

    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=args.output_dir, use_cpu=True, report_to="none", max_steps=args.max_steps,
                               learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
                               per_device_eval_batch_size=args.batch_size, save_strategy="no", logging_steps=5,
                               seed=args.seed),
        train_dataset=split["train"],
        eval_dataset=split["test"],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[RouterTelemetryCallback()] if is_moe else [],
    )
    trainer.train()
    metrics = trainer.evaluate()
    metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    if args.save_model:
        trainer.save_model(args.output_dir)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
