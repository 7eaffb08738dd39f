"""Evaluate a causal hf-moe family model with lm-evaluation-harness, passing the model *object* to `HFLM`.

NOT RUN IN CI: `lm_eval` is not a dependency of hf-moe (`pip install lm-eval`), and the tasks download their data
from the Hub. `lm_eval` is imported lazily inside `main`, so this file imports without it.

    python examples/lm_eval_example.py --model ./my-llama --family dynamic_moe --tasks hellaswag --limit 50
    python examples/lm_eval_example.py --model ./llama-topp-moe      # an already-upcycled hf-moe checkpoint
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moe  # noqa: F401  (registers the families with the Auto classes)
from hf_moe.conversion import upcycle_model
from hf_moe.options import add_moe_arguments, moe_arguments


def load_model(path, family=None, **upcycle_kwargs):
    """A causal LM: the checkpoint itself (dense or hf-moe), or the dense checkpoint upcycled into `family`
    (`upcycle_kwargs`: `upcycle_model`'s keywords, e.g. num_experts, num_experts_per_tok, router_top_p)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if family is not None:
        model = upcycle_model(model, family, **upcycle_kwargs)
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="causal checkpoint (dense decoder or hf-moe)")
    p.add_argument("--tasks", default="hellaswag", help="comma-separated lm_eval task names")
    p.add_argument("--limit", type=int, default=50, help="examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    add_moe_arguments(p, family_help="upcycle the dense checkpoint into this family first")
    args = p.parse_args(argv)
    moe = moe_arguments(args)

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise SystemExit("this example needs lm-evaluation-harness: pip install lm-eval") from error

    model = load_model(args.model, moe.family, **moe.upcycle_kwargs())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)  # a model object, not a name
    results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","), limit=args.limit)
    print(json.dumps(results["results"], indent=2, default=str))


if __name__ == "__main__":
    main()
