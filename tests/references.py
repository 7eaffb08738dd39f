"""Naive references for the hf-moe layers: one token at a time, float64, torch primitives only.

Everything here is written from the specification (docs methods.md §1-§5), not from hf_moe's code: no hf_moe
function is called, and a layer is only read through its parameters, by name. The references keep the autograd
graph to those parameters (and to the input), so the same scalar loss can be differentiated through a layer and
through its reference and every gradient compared.

Conventions: `x` is [B, S, H]; `padding_mask` is [B, S] of 1/0 or None; "real" tokens are the non-padding ones.
Outputs are compared only at real tokens (padding outputs are unspecified); losses count only real tokens.
"""

import math

import torch

# --------------------------------------------------------------------------------------------- primitives


def act(name: str, v: torch.Tensor) -> torch.Tensor:
    """The three activations of the supported backbones, written out."""
    if name == "silu":
        return v / (1.0 + torch.exp(-v))
    if name == "gelu":  # exact (erf) GELU: BERT, `ACT2FN["gelu"]`
        return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    if name == "relu":
        return torch.where(v > 0, v, torch.zeros_like(v))
    raise ValueError(name)


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def logsumexp(z: torch.Tensor) -> torch.Tensor:
    m = z.max()
    return m + torch.log(torch.exp(z - m).sum())


def linear(weight: torch.Tensor, bias: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """One row: weight [out, in] @ v [in] (+ bias)."""
    out = torch.mv(weight, v)
    return out if bias is None else out + bias


def descending(p: torch.Tensor) -> list[int]:
    """Expert indices by decreasing probability (ties: lower index first)."""
    values = p.detach().tolist()
    return sorted(range(len(values)), key=lambda e: (-values[e], e))


def params_of(module) -> dict:
    return dict(module.named_parameters())


# --------------------------------------------------------------------------------------------- one expert


def expert_ffn(experts, e: int, v: torch.Tensor, act_name: str) -> torch.Tensor:
    """FFN_e(v) from the fused experts' parameters, read by name.

    gated:  down[e] @ (act(G v) * (U v)) with gate_up_proj[e] = [G; U] (gate rows first), no bias;
    biased: down[e] @ act(up[e] v + b_up[e]) + b_down[e];
    plain:  down[e] @ act(up[e] v).
    """
    p = params_of(experts)
    if "gate_up_proj" in p:
        inter = p["gate_up_proj"].shape[1] // 2
        gate_up = linear(p["gate_up_proj"][e], None, v)
        hidden = act(act_name, gate_up[:inter]) * gate_up[inter:]
        return linear(p["down_proj"][e], None, hidden)
    up_bias = p["up_proj_bias"][e] if "up_proj_bias" in p else None
    down_bias = p["down_proj_bias"][e] if "down_proj_bias" in p else None
    hidden = act(act_name, linear(p["up_proj"][e], up_bias, v))
    return linear(p["down_proj"][e], down_bias, hidden)


# --------------------------------------------------------------------------------------------- routing rules


def norm_rule(norm_topk_prob, top_k: int) -> bool:
    """methods.md §1: None means renormalise for k >= 2, not for k = 1."""
    return top_k >= 2 if norm_topk_prob is None else bool(norm_topk_prob)


def choose_top_k(probs: torch.Tensor, top_k: int, normalize: bool):
    chosen = descending(probs)[:top_k]
    weights = torch.stack([probs[e] for e in chosen])
    return chosen, (weights / weights.sum() if normalize else weights)


def choose_top_k_softmax_of_selected(logits: torch.Tensor, top_k: int):
    """HyperRouter (methods.md §3): top-k on the raw logits, softmax over the k selected logits only."""
    chosen = descending(logits)[:top_k]
    return chosen, softmax(torch.stack([logits[e] for e in chosen]))


def choose_top_p(probs: torch.Tensor, top_p: float, max_experts: int | None, normalize: bool):
    """Dynamic routing (methods.md §5.1): the shortest prefix, by decreasing probability, whose cumulative
    probability is strictly greater than p; at least one expert; all E if no prefix exceeds p; capped."""
    order = descending(probs)
    values = probs.detach().tolist()
    count, total = len(order), 0.0
    for i, e in enumerate(order):
        total += values[e]
        if total > top_p and top_p < 1.0:  # a prefix of probabilities never exceeds 1 (rounding aside)
            count = i + 1
            break
    if max_experts is not None:
        count = min(count, max_experts)
    chosen = order[:count]
    weights = torch.stack([probs[e] for e in chosen])
    return chosen, (weights / weights.sum() if normalize else weights)


def capacity_keep(selections: list[list[int]], real: list[bool], top_k: int, num_experts: int, factor):
    """Switch capacity (methods.md §1 / brief): capacity = ceil(c * T_real * k / E); every token's first choice
    claims a slot before any second choice, and within one rank tokens claim in order; padding tokens claim
    nothing. Defined for the top-k families (k fixed). Returns keep[t][j]."""
    if factor is None:
        return [[True for _ in sel] for sel in selections]
    keep = [[False for _ in sel] for sel in selections]
    capacity = math.ceil(factor * sum(real) * top_k / num_experts)
    used = [0] * num_experts
    for rank in range(max((len(s) for s in selections), default=0)):
        for t, sel in enumerate(selections):
            if not real[t] or rank >= len(sel):
                continue
            e = sel[rank]
            if used[e] < capacity:
                used[e] += 1
                keep[t][rank] = True
    return keep


# --------------------------------------------------------------------------------------------- HyperMoE


def hyper_expert(layer, generator, chosen: list[int], v: torch.Tensor) -> torch.Tensor:
    """HyperMoE's HyperExpert for ONE token (methods.md §2.1), generated from scratch for this token."""
    lp, gp = params_of(layer), params_of(generator)
    num_experts = lp["expert_embedding.weight"].shape[0]
    s = torch.zeros_like(lp["expert_embedding.weight"][0])
    for e in range(num_experts):
        if e not in chosen:  # unselected experts, taken before any capacity drop
            s = s + lp["expert_embedding.weight"][e]
    u = linear(lp["embedding_process.0.weight"], lp["embedding_process.0.bias"], s)
    u = linear(lp["embedding_process.2.weight"], lp["embedding_process.2.bias"], act("relu", u))
    c = torch.cat([u, gp["layer_embedding.weight"][layer.layer_idx]])
    g = act("relu", linear(gp["trunk.weight"], gp["trunk.bias"], c))
    d = v.shape[0]
    rank = gp["bias_down.bias"].shape[0]
    w_down = linear(gp["weight_down.weight"], gp["weight_down.bias"], g).reshape(d, rank)
    b_down = linear(gp["bias_down.weight"], gp["bias_down.bias"], g)
    w_up = linear(gp["weight_up.weight"], gp["weight_up.bias"], g).reshape(rank, d)
    b_up = linear(gp["bias_up.weight"], gp["bias_up.bias"], g)
    hidden = act("relu", torch.mv(w_down.t(), v) + b_down)  # x @ W_down + b_down
    return torch.mv(w_up.t(), hidden) + b_up  # (.) @ W_up + b_up


# --------------------------------------------------------------------------------------------- layers


def _router_rows(layer, family: str, rows: list[torch.Tensor], config):
    """Per routed row: logits z [E], full softmax P [E], chosen experts, their combine weights."""
    num_experts = config.num_experts
    out = []
    if family == "hyperrouter":
        rp = params_of(layer.router)
        hp = layer.router.hypernet.state_dict(keep_vars=True)  # frozen: held as buffers
        hidden = act("relu", linear(hp["0.weight"], hp["0.bias"], rp["router_embedding"]))
        theta = linear(hp["2.weight"], hp["2.bias"], hidden).reshape(num_experts, -1)  # [E, d+1]
        w_router, b_router = theta[:, :-1], theta[:, -1]
    else:
        w_router, b_router = params_of(layer.router)["weight"], None
    for v in rows:
        z = linear(w_router, b_router, v)
        p = softmax(z)
        if family == "dynamic":
            chosen, w = choose_top_p(p, config.router_top_p, config.router_max_experts, bool(config.norm_topk_prob))
        elif family == "hyperrouter":
            chosen, w = choose_top_k_softmax_of_selected(z, config.num_experts_per_tok)
        else:
            k = config.num_experts_per_tok
            chosen, w = choose_top_k(p, k, norm_rule(config.norm_topk_prob, k))
        out.append((z, p, chosen, w))
    return out


def reference_layer(layer, family: str, x: torch.Tensor, padding_mask, act_name: str, generator=None) -> dict:
    """The layer's MoeLayerOutput fields, computed naively. family: topk | hypermoe | hyperrouter | mh | dynamic."""
    config = layer.config
    batch, seq, d = x.shape
    num_experts = config.num_experts
    heads = getattr(config, "moe_num_heads", 1) if family == "mh" else 1
    sub = d // heads
    mp = params_of(layer)

    tokens = [x[b, s] for b in range(batch) for s in range(seq)]
    real_tok = [True] * len(tokens) if padding_mask is None else [bool(m) for m in padding_mask.reshape(-1).tolist()]

    # rows that are routed: tokens, or MH-MoE sub-tokens (token-major, h adjacent pieces of the projected token)
    rows, real = [], []
    for v, r in zip(tokens, real_tok):
        if heads > 1:
            v = linear(mp["head_proj.weight"], mp["head_proj.bias"], v)
        for j in range(heads):
            rows.append(v[j * sub : (j + 1) * sub])
            real.append(r)

    routed = _router_rows(layer, family, rows, config)
    selections = [chosen for _, _, chosen, _ in routed]
    k_cap = config.num_experts_per_tok
    keep = capacity_keep(selections, real, k_cap, num_experts, config.expert_capacity_factor)

    row_out = []
    for t, (v, (z, p, chosen, w)) in enumerate(zip(rows, routed)):
        y = torch.zeros_like(v)
        for j, e in enumerate(chosen):
            if keep[t][j]:
                y = y + w[j] * expert_ffn(layer.experts, e, v, act_name)
        if family == "hypermoe":
            y = y + hyper_expert(layer, generator, chosen, v)
        row_out.append(y)

    token_out = []
    for i in range(len(tokens)):
        y = torch.cat(row_out[i * heads : (i + 1) * heads])
        if heads > 1:
            y = linear(mp["merge_proj.weight"], mp["merge_proj.bias"], y)
        token_out.append(y)
    hidden = torch.stack(token_out).reshape(batch, seq, d)

    # losses over real routed rows: Switch balance (every selected expert counts), z-loss, entropy
    n_real = sum(real)
    real_rows = [r for r, keep_row in zip(routed, real) if keep_row]
    fraction = [sum(1.0 for _, _, chosen, _ in real_rows if e in chosen) / n_real for e in range(num_experts)]
    mean_prob = sum(p for _, p, _, _ in real_rows) / n_real
    aux = num_experts * sum(fraction[e] * mean_prob[e] for e in range(num_experts))
    z_loss = sum(logsumexp(z) ** 2 for z, _, _, _ in real_rows) / n_real
    result = {
        "hidden_states": hidden,
        "router_logits": torch.stack([z for z, _, _, _ in routed]),
        "aux_loss": aux,
        "z_loss": z_loss,
        "real_tokens": torch.tensor(real_tok),
        "selections": selections,
        "keep": keep,
        "entropy_loss": sum(-(p * torch.log(p)).sum() for _, p, _, _ in real_rows) / n_real,
        "expert_load": torch.tensor(fraction, dtype=torch.float64),
        "mean_experts_per_token": torch.tensor(
            sum(len(chosen) for _, _, chosen, _ in real_rows) / n_real, dtype=torch.float64
        ),
    }
    return result
