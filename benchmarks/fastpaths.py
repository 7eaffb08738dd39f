"""Measured fast-path proposals for hf_moe (monkeypatched inside this process only; hf_moe/ is not edited).

    python benchmarks/fastpaths.py            # correctness checks, A/B timings, diagnostics (~8 min)
    python benchmarks/fastpaths.py --quick    # small sizes (< 1 min)

Proposal 1 (`hf_moe/modeling/experts.py`, `SortedLoopExperts.forward`): gather and combine the (token, expert) pairs
with `index_select` only, never `index_add_` / `index_put_(accumulate=True)`.
  Why: on this torch 2.13 CPU build `Tensor.index_add_` (dim 0, 2-D) goes through scatter_add's parallel path and
  opens OpenMP parallel regions even for one row; when the machine's two cores are shared with other processes, every
  region can stall for a scheduler slice. Measured here: `index_add_` of 2 rows into [1, 512] takes ~50 ms median with
  2 threads under load (14 us with 1 thread), and the autograd backward of `x[token_of_pair]` is an accumulating
  `index_put_` with the same problem. The proposal keeps one sort, one host sync and the per-expert loop, and
  replaces both scatters by gathers through the inverse permutation of the pairs (two tiny autograd Functions, each
  the other's adjoint). For k = 2 the sums are bitwise identical to the current code (a + b in both orders); for
  k > 2 the summation order changes (float rounding only).

Proposal 2 (`hf_moe/modeling/moe_topk.py`, `TopKMoeLayer.forward` / `router_losses`): skip the router statistics
(aux, z, entropy, expert load, mean experts) when they cannot be used: not training and grad disabled and no router
logits requested. Measured here by timing greedy generation with `router_losses` patched to return zeros of the right
shapes (a real change would return None and make `MoePreTrainedModel.forward` skip None when summing aux_loss).
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from _common import (
    bench_round_robin,
    contention_summary,
    fmt_ms,
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

import hf_moe
from hf_moe.modeling import experts as experts_module
from hf_moe.modeling import moe_topk

ORIGINAL_FORWARD = experts_module.SortedLoopExperts.forward
ORIGINAL_ROUTER_LOSSES = moe_topk.TopKMoeLayer.router_losses


# ---------------------------------------------------------------------------------------------------------------
# proposal 1: the code to put into experts.py


STATS = {}  # contention statistics of every timed call (see _common.bench_round_robin)

def _sum_pairs(rows, inverse, top_k):
    """rows [P, H] in expert order -> [T, H], each token's k pair rows summed (pairs past P are sentinels: 0)."""
    num_pairs = inverse.numel()
    if rows.shape[0] < num_pairs:
        rows = torch.cat([rows, rows.new_zeros(num_pairs - rows.shape[0], rows.shape[1])])
    per_pair = rows.index_select(0, inverse).view(num_pairs // top_k, top_k, rows.shape[1])  # [T, k, H]
    out = per_pair[:, 0]
    for slot in range(1, top_k):
        out = out + per_pair[:, slot]
    return out


class _GatherPairs(torch.autograd.Function):
    """x [T, H] -> x[token_of_pair] [P, H]; backward sums each token's pair gradients with gathers (no scatter)."""

    @staticmethod
    def forward(ctx, x, token_of_pair, inverse, top_k):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, token_of_pair)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _sum_pairs(grad, inverse, ctx.top_k), None, None, None


class _CombinePairs(torch.autograd.Function):
    """rows [P, H] (expert order) -> [T, H] per-token sums; backward is a gather by token (the adjoint of the above)."""

    @staticmethod
    def forward(ctx, rows, inverse, token_of_pair, top_k):
        ctx.save_for_backward(token_of_pair)
        return _sum_pairs(rows, inverse, top_k)

    @staticmethod
    def backward(ctx, grad):
        (token_of_pair,) = ctx.saved_tensors
        return grad.index_select(0, token_of_pair), None, None, None


def fast_sorted_loop_forward(self, hidden_states, top_k_index, top_k_weights):
    # hidden_states [T, H], top_k_index [T, k] (sentinel = num_experts), top_k_weights [T, k]
    top_k = top_k_index.shape[1]
    expert_of_pair, pair_order = top_k_index.reshape(-1).sort(stable=True)  # [T*k]
    counts = torch.bincount(expert_of_pair, minlength=self.num_experts + 1)[: self.num_experts].tolist()
    num_routed = sum(counts)
    if num_routed == 0:
        return torch.zeros_like(hidden_states)
    inverse = torch.empty_like(pair_order).scatter_(0, pair_order, torch.arange(pair_order.numel()))  # [T*k]
    routed = pair_order[:num_routed]
    token_of_pair = routed // top_k  # [P]
    first = (self.gate_up_proj if self.has_gate else self.up_proj).unbind(0)
    first_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias).unbind(0) if self.has_bias else None
    down = self.down_proj.unbind(0)
    down_bias = self.down_proj_bias.unbind(0) if self.has_bias else None

    pieces = []
    for expert, chunk in enumerate(_GatherPairs.apply(hidden_states, token_of_pair, inverse, top_k).split(counts)):
        if chunk.shape[0] == 0:
            continue
        hidden = F.linear(chunk, first[expert], first_bias[expert] if self.has_bias else None)
        hidden = self._apply_gate(hidden) if self.has_gate else self.act_fn(hidden)
        pieces.append(F.linear(hidden, down[expert], down_bias[expert] if self.has_bias else None))
    weights = top_k_weights.reshape(-1).index_select(0, routed).to(hidden_states.dtype)  # [P]
    rows = torch.cat(pieces) * weights[:, None]
    return _CombinePairs.apply(rows, inverse, token_of_pair, top_k)


_EAGER = [ORIGINAL_FORWARD]  # the eager backend currently in use


def set_experts_forward(fast: bool):
    _EAGER[0] = fast_sorted_loop_forward if fast else ORIGINAL_FORWARD


def install_switch():
    """Make the eager backend of every hf-moe experts class call `_EAGER[0]` (switchable per call)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    for cls in (experts_module.GatedExperts, experts_module.BiasedExperts, experts_module.PlainExperts):

        def forward(self, *args, **kwargs):
            impl = self.config._experts_implementation
            if impl in (None, "eager"):
                return _EAGER[0](self, *args, **kwargs)
            return ALL_EXPERTS_FUNCTIONS.get_interface(impl, None)(self, *args, **kwargs)

        cls.forward = forward


# ---------------------------------------------------------------------------------------------------------------
# proposal 2: skip router statistics at inference (measured with a stand-in returning zeros)

_SKIP_STATS = [False]


def router_losses_maybe_skipped(self, logits, probs, index, token_mask):
    if _SKIP_STATS[0] and not self.training and not torch.is_grad_enabled():
        zero = logits.new_zeros(())
        return {"aux_loss": zero, "z_loss": zero, "entropy_loss": zero,
                "expert_load": logits.new_zeros(self.num_experts), "mean_experts_per_token": zero}
    return ORIGINAL_ROUTER_LOSSES(self, logits, probs, index, token_mask)


# ---------------------------------------------------------------------------------------------------------------
# checks and timings


def check_equivalence():
    """Outputs and all gradients of the fast path vs the current code: top-k (k = 1, 2, 4), top-p with sentinels,
    capacity drops, biased/gated experts, fp32 and fp64. Returns rows for the report."""
    from hf_moe import DynamicMoeConfig, DynamicMoeLayer, FfnSpec, TopKMoeConfig, TopKMoeLayer

    rows = []
    for dtype in (torch.float32, torch.float64):
        for gated in (True, False):
            for label, cls, cfg_cls, extra in (
                ("top-1", TopKMoeLayer, TopKMoeConfig, {"num_experts_per_tok": 1}),
                ("top-2", TopKMoeLayer, TopKMoeConfig, {"num_experts_per_tok": 2}),
                ("top-4", TopKMoeLayer, TopKMoeConfig, {"num_experts_per_tok": 4}),
                ("top-2 capacity 0.5", TopKMoeLayer, TopKMoeConfig, {"expert_capacity_factor": 0.5}),
                ("top-p 0.6 (sentinels)", DynamicMoeLayer, DynamicMoeConfig, {"router_top_p": 0.6}),
            ):
                torch.manual_seed(0)
                config = cfg_cls(text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                                              "num_hidden_layers": 1, "num_attention_heads": 4},
                                 num_experts=8, experts_implementation="eager", initializer_range=0.3, **extra)
                ffn = FfnSpec(64, 96, "silu" if gated else "gelu", gated=gated, bias=not gated)
                layer = cls(config, ffn).to(dtype)
                x = torch.randn(3, 37, 64, dtype=dtype)
                probe = torch.randn_like(x)
                results = []
                for fast in (False, True):
                    set_experts_forward(fast)
                    xx = x.clone().requires_grad_(True)
                    layer.zero_grad(set_to_none=True)
                    out = layer(xx)
                    ((out.hidden_states * probe).sum() + out.aux_loss).backward()
                    results.append([out.hidden_states.detach(), xx.grad] + [p.grad for p in layer.parameters()])
                set_experts_forward(False)
                max_abs = max((a - b).abs().max().item() for a, b in zip(*results))
                scale = max(a.abs().max().item() for a in results[0])
                rows.append({"case": f"{label}, {'gated' if gated else 'biased'}, {str(dtype).split('.')[-1]}",
                             "max_abs_diff": max_abs, "max_abs_value": scale,
                             "bitwise_equal": all(torch.equal(a, b) for a, b in zip(*results))})
    return rows


def layer_ab(hidden, intermediate, tokens, repeats):
    from layers import build_cases

    cases = {c.name: c for c in build_cases(hidden, intermediate, tokens, all_impls=False)}
    calls = {}
    for name in ("top-k eager", "dynamic top-p (~2 experts) eager"):
        case = cases[name]
        for mode in ("fwd", "fwd_bwd"):
            for fast in (False, True):
                def call(case=case, mode=mode, fast=fast):
                    set_experts_forward(fast)
                    getattr(case, mode)()
                calls[(name, mode, "fast" if fast else "current")] = call
    floor = cases["floor: dense FFN x k"]
    calls[("floor", "fwd", "-")] = floor.fwd
    calls[("floor", "fwd_bwd", "-")] = floor.fwd_bwd
    times = bench_round_robin(calls, repeats=repeats, warmup=1, stats=STATS)
    set_experts_forward(False)
    rows = []
    for name in ("top-k eager", "dynamic top-p (~2 experts) eager"):
        for mode in ("fwd", "fwd_bwd"):
            cur, fast = times[(name, mode, "current")], times[(name, mode, "fast")]
            rows.append({"case": name, "mode": mode.replace("_", "+"), "current": summary(cur), "fast": summary(fast),
                         "fast_vs_current": paired_ratio(fast, cur),
                         "current_vs_floor": paired_ratio(cur, times[("floor", mode, "-")]),
                         "fast_vs_floor": paired_ratio(fast, times[("floor", mode, "-")])})
    return rows


def generation_ab(repeats, quick):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_moe.conversion import upcycle_model

    hidden, intermediate, vocab, layers, new = (128, 352, 1000, 2, 8) if quick else (512, 1408, 32000, 4, 32)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()
    models = {"dense": dense}
    for family in ("topk_moe", "dynamic_moe"):
        torch.manual_seed(0)
        models[family] = upcycle_model(dense, family).eval()
    prompt = torch.randint(10, vocab, (1, 32))
    variants = {"current": (False, False), "fast experts": (True, False), "fast experts + no stats": (True, True)}
    outputs, calls = {}, {}
    for name, model in models.items():
        for variant, (fast, skip) in variants.items():
            if name == "dense" and variant != "current":
                continue

            def call(model=model, fast=fast, skip=skip, key=(name, variant)):
                set_experts_forward(fast)
                _SKIP_STATS[0] = skip
                with torch.no_grad():
                    outputs[key] = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                                  pad_token_id=0)

            calls[(name, variant)] = call
    times = bench_round_robin(calls, repeats=repeats, warmup=1, stats=STATS)
    set_experts_forward(False)
    _SKIP_STATS[0] = False
    rows = []
    for (name, variant), t in times.items():
        rows.append({"model": name, "variant": variant, "call": summary(t), "tokens_per_s": new / summary(t)["median"],
                     "vs_current": paired_ratio(times[(name, "current")], t),
                     "vs_dense": paired_ratio(times[("dense", "current")], t),
                     "same_tokens_as_current": torch.equal(outputs[(name, variant)], outputs[(name, "current")])})
    return {"config": {"hidden": hidden, "intermediate": intermediate, "vocab": vocab, "layers": layers,
                       "new_tokens": new}, "rows": rows}


class ChunkedFloor(torch.nn.Module):
    """The floor's FFN run k times on the T tokens split into `chunks` equal pieces: per-GEMM row counts like the
    per-expert loop's (T*k/E rows), no routing work. Separates GEMM-shape cost from routing overhead."""

    def __init__(self, floor, chunks):
        super().__init__()
        self.floor, self.chunks = floor, chunks

    def forward(self, x):
        return torch.cat([self.floor(c) for c in x.reshape(-1, x.shape[-1]).chunk(self.chunks)]).view_as(x)


class MultiHeadFloor(torch.nn.Module):
    """MH-MoE's arithmetic without routing: head projection, one sub-token SwiGLU expert (width w) run k times on
    all h*T sub-tokens, merge projection."""

    def __init__(self, layer, top_k):
        super().__init__()
        from layers import DenseFloor

        self.layer = layer
        self.ffn = DenseFloor(layer.experts.gate_up_proj[0], layer.experts.down_proj[0], top_k)

    def forward(self, x):
        y = self.layer.head_proj(x)
        y = self.ffn(y.reshape(-1, self.layer.hidden_size)).reshape(x.shape)
        return self.layer.merge_proj(y)


def diagnostics(hidden, intermediate, tokens, repeats):
    """Where the time goes: GEMM shape (chunked floor) vs routing overhead; MH-MoE against its own floor."""
    from layers import Case, build_cases

    cases = {c.name: c for c in build_cases(hidden, intermediate, tokens, all_impls=False)}
    floor = cases["floor: dense FFN x k"]
    mh = cases["MH-MoE (FLOP-matched) eager"]
    extra = [
        Case("floor in E chunks (per-expert GEMM shapes)", ChunkedFloor(floor.module, 8), floor.x, floor.probe),
        Case("MH-MoE floor (head + sub-token FFN x k + merge)", MultiHeadFloor(mh.module, 2), mh.x, mh.probe),
        Case("MH-MoE floor in E_mh chunks", ChunkedFloor(MultiHeadFloor(mh.module, 2), 1), mh.x, mh.probe),
    ]
    # the MH floor in per-expert chunks: chunk the sub-tokens, not the tokens
    mh_chunked = MultiHeadFloor(mh.module, 2)
    count = mh.module.num_experts
    mh_chunked.ffn = ChunkedFloor(mh_chunked.ffn, count)
    extra[2] = Case(f"MH-MoE floor in {count} chunks (per-expert GEMM shapes)", mh_chunked, mh.x, mh.probe)
    chosen = [floor, cases["top-k eager"], mh] + extra
    calls = {}
    for case in chosen:
        calls[(case.name, "fwd")] = case.fwd
        calls[(case.name, "fwd+bwd")] = case.fwd_bwd
    times = bench_round_robin(calls, repeats=repeats, warmup=1, stats=STATS)
    rows = []
    for case in chosen:
        row = {"case": case.name}
        for mode in ("fwd", "fwd+bwd"):
            row[mode] = summary(times[(case.name, mode)])
            row[mode + " / floor"] = paired_ratio(times[(case.name, mode)], times[(floor.name, mode)])
            row[mode + " / top-k"] = paired_ratio(times[(case.name, mode)], times[("top-k eager", mode)])
        rows.append(row)
    return rows


def index_add_probe(repeats):
    """The primitive behind proposal 1: index_add_ vs the gather-based combine, 1 and 4096 tokens, 2 threads."""
    calls = {}
    for tokens in (1, 4096):
        index = torch.randint(0, 8, (tokens, 2))
        _, order = index.reshape(-1).sort(stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
        rows = torch.randn(tokens * 2, 512)
        token_of_pair = order // 2
        calls[(tokens, "index_add_")] = lambda t=tokens, r=rows, p=token_of_pair: torch.zeros(t, 512).index_add_(0, p, r)
        calls[(tokens, "gather + add")] = lambda r=rows, i=inverse: _sum_pairs(r, i, 2)
    times = bench_round_robin(calls, repeats=repeats, warmup=2, log=False, stats=STATS)
    return [{"tokens": k[0], "op": k[1], "time": summary(v)} for k, v in times.items()]


def markdown(res, info, args):
    parts = ["# Fast-path proposals, measured by monkeypatching", "", machine_markdown(info), "",
             f"Command: `python benchmarks/fastpaths.py{' --quick' if args.quick else ''}`. "
             "See the module docstring for the proposed code.", "",
             "## Primitive: combining 2 pair rows per token into [T, 512] (2 threads)", "",
             md_table(["tokens", "op", "ms"], [[r["tokens"], r["op"], fmt_ms(r["time"])] for r in res["probe"]]), "",
             "## Equivalence of proposal 1 (outputs, input and parameter gradients)", "",
             md_table(["case", "max |diff|", "max |value|", "bitwise equal"],
                      [[r["case"], f"{r['max_abs_diff']:.2e}", f"{r['max_abs_value']:.2e}", r["bitwise_equal"]]
                       for r in res["equivalence"]]), ""]
    lab = res["layer_sizes"]
    parts += [f"## Proposal 1 at layer level: hidden {lab[0]}, expert FFN {lab[1]}, {lab[2]} tokens", "",
              md_table(["case", "mode", "current ms", "fast ms", "fast / current", "current / floor", "fast / floor"],
                       [[r["case"], r["mode"], fmt_ms(r["current"]), fmt_ms(r["fast"]), fmt_ratio(r["fast_vs_current"]),
                         fmt_ratio(r["current_vs_floor"]), fmt_ratio(r["fast_vs_floor"])] for r in res["layer"]]), ""]
    dsz = res["diagnostic_sizes"]
    parts += [f"## Diagnostics: hidden {dsz[0]}, expert FFN {dsz[1]}, {dsz[2]} tokens", "",
              md_table(["case", "fwd ms", "fwd / floor", "fwd / top-k", "fwd+bwd ms", "fwd+bwd / floor",
                        "fwd+bwd / top-k"],
                       [[r["case"], fmt_ms(r["fwd"]), fmt_ratio(r["fwd / floor"]), fmt_ratio(r["fwd / top-k"]),
                         fmt_ms(r["fwd+bwd"]), fmt_ratio(r["fwd+bwd / floor"]), fmt_ratio(r["fwd+bwd / top-k"])]
                        for r in res["diagnostics"]]), ""]
    g = res["generation"]
    c = g["config"]
    parts += [f"## Proposals 1 + 2 in greedy generation: random Llama hidden {c['hidden']}, {c['layers']} layers, "
              f"vocab {c['vocab']}, {c['new_tokens']} new tokens, batch 1", "",
              md_table(["model", "variant", "generate ms", "tokens/s", "speed-up vs current", "throughput / dense",
                        "same tokens"],
                       [[r["model"], r["variant"], fmt_ms(r["call"]), f"{r['tokens_per_s']:.1f}",
                         fmt_ratio(r["vs_current"]), fmt_ratio(r["vs_dense"]), r["same_tokens_as_current"]]
                        for r in g["rows"]]), ""]
    return "\n".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    logging.getLogger("hf_moe").setLevel(logging.ERROR)
    setup_threads(2)
    install_switch()
    moe_topk.TopKMoeLayer.router_losses = router_losses_maybe_skipped
    info = machine_info()
    res = {"probe": index_add_probe(args.repeats), "equivalence": check_equivalence()}
    sizes = (256, 1024, 512) if args.quick else (512, 2048, 4096)
    res["layer_sizes"] = sizes
    res["layer"] = layer_ab(*sizes, args.repeats)
    res["diagnostic_sizes"] = sizes
    res["diagnostics"] = diagnostics(*sizes, args.repeats)
    res["generation"] = generation_ab(args.repeats, args.quick)
    info["load_average_end"] = load_average()
    info["contention"] = contention_summary(STATS)
    write_results("fastpaths", {"benchmark": "fastpaths", "machine": info, "quick": args.quick, **res},
                  markdown(res, info, args), args.quick)


if __name__ == "__main__":
    main()
