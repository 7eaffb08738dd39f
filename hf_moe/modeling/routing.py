"""Routing rules and router losses shared by every family (docs/topk.md §2-§3, docs/dynamic.md §2-§3).

Selections are `[T, k]` index tensors; a slot holding `num_experts` is a sentinel (no expert, weight 0), used for
top-p padding and capacity drops. Statistics take an optional boolean `token_mask` [T] and ignore masked tokens.

Under data parallelism (transformers' distributed engine, `fsdp_size` > 1) each rank routes its own batch, but the
statistics are those of the global batch: a forward names the group of ranks holding different batches in
`STATISTICS_GROUP`, and every token mean sums over it (docs/backbones.md §5).
"""

import torch
import torch.distributed.nn.functional as distributed
from transformers.utils.output_capturing import CompileableContextVar

# the process group over which the running forward's token statistics are taken (None: this process's tokens)
STATISTICS_GROUP = CompileableContextVar("hf_moe_statistics_group")


def router_dtype(dtype: torch.dtype, setting: str = "float32") -> torch.dtype:
    """The dtype a router computes its logits in for a model of `dtype` (docs/topk.md §6, item 3): float32 at least
    (float64 stays float64, bf16/fp16 go up), or the model dtype itself for `router_dtype="model"`."""
    return dtype if setting == "model" else torch.promote_types(dtype, torch.float32)


def masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token axis (dim 0) of `values` [T, ...], counting only tokens where `token_mask` is True (and
    the tokens of every rank of `STATISTICS_GROUP`)."""
    group = STATISTICS_GROUP.get()
    if token_mask is None and group is None:
        return values.mean(0)
    if token_mask is None:
        total = values.sum(0)
    else:
        # select, never multiply by the mask: a NaN or Inf at a padding position times 0 is still NaN
        total = torch.where(token_mask.reshape(-1, *([1] * (values.dim() - 1))), values, 0).sum(0)
    if group is not None:
        # autograd's all-reduce sums the gradient back to every rank, so that averaging the ranks' gradients (as
        # data parallelism does) gives the gradient of the global statistic
        total = distributed.all_reduce(total, group=group)
    return total / _token_count(values, token_mask).clamp(min=1)


def top_k_routing(probs: torch.Tensor, top_k: int, normalize: bool):
    """Indices and weights of the k most probable experts; renormalised to sum to 1 if `normalize`."""
    weights, index = probs.topk(top_k, dim=-1)  # [T, k]
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return index, weights


def top_p_routing(probs: torch.Tensor, top_p: float, max_experts: int | None, normalize: bool):
    """Dynamic routing (Huang et al. 2024, §2): the shortest prefix of experts, by descending probability, whose
    cumulative probability exceeds `top_p` (strict >, at least one expert, all experts if no prefix exceeds it).

    Returns `index` and `weights` [T, k_used], padded with sentinels to the widest selection in the batch.
    """
    num_experts = probs.shape[-1]
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # prefixes with cumulative mass <= p are too short; the first one past p is the answer. p >= 1 keeps every
    # expert explicitly: rounding can push a float cumsum past 1 before the last expert
    too_short = (sorted_probs.cumsum(-1) <= top_p).sum(-1) if top_p < 1 else torch.full_like(order[:, 0], num_experts)
    num_selected = (too_short + 1).clamp(max=max_experts or num_experts)
    # pad to the widest selection in the batch (one host sync); compile/export need a static width: every expert
    k_used = num_experts if torch.compiler.is_compiling() else int(num_selected.max())
    keep = torch.arange(k_used, device=probs.device) < num_selected[:, None]  # [T, k_used]
    index = order[:, :k_used].masked_fill(~keep, num_experts)
    weights = sorted_probs[:, :k_used].masked_fill(~keep, 0.0)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return index, weights


def capacity_mask(index, num_experts: int, capacity: int, group_size: int | None = None, token_mask=None):
    """[T, k] bool, True for the slots an expert takes (Fedus et al. 2022 §2.2): each expert takes at most `capacity`
    slots in each group of `group_size` consecutive tokens (None: the whole batch); the first choices of a group's
    tokens claim slots before its second choices, then in token order. Sentinel slots and masked tokens take none.
    """
    num_tokens, top_k = index.shape
    if token_mask is not None:
        index = index.masked_fill(~token_mask[:, None], num_experts)
    group_size = group_size or num_tokens
    rank_major = index.view(-1, group_size, top_k).transpose(1, 2).reshape(-1, top_k * group_size)  # [G, k*S]
    claims = torch.nn.functional.one_hot(rank_major, num_experts + 1)  # [G, k*S, E+1]
    position = (claims.cumsum(1) * claims).sum(-1)  # [G, k*S]: 1-based slot of each claim at its expert
    position = position.view(-1, top_k, group_size).transpose(1, 2).reshape(num_tokens, top_k)  # [T, k]
    return (position <= capacity) & (index < num_experts)


def selection_mask(index, num_experts: int, dtype) -> torch.Tensor:
    """[T, E]: 1 for the experts each row of `index` [T, k] selects (a sentinel slot, index E, selects nothing)."""
    mask = torch.zeros(index.shape[0], num_experts + 1, dtype=dtype, device=index.device)
    return mask.scatter_(1, index, 1.0)[:, :num_experts]


def expert_load(index: torch.Tensor, num_experts: int, token_mask=None, dtype=torch.float32) -> torch.Tensor:
    """[E]: fraction of (non-padding) tokens whose selected set contains each expert; sums to the mean number of
    experts per token (sentinel slots ignored)."""
    return masked_mean(selection_mask(index, num_experts, dtype), token_mask)


def load_balancing_loss(probs, load, token_mask=None) -> torch.Tensor:
    """Switch eq. 4-6 for any selection: `E * sum_e f_e * mean_P_e`, with f = `expert_load` of the actual selection
    (multi-assignment for top-k and top-p) and P the full softmax, both over non-padding tokens."""
    return probs.shape[-1] * (load * masked_mean(probs, token_mask)).sum()


def router_z_loss(logits, token_mask=None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(z)^2."""
    return masked_mean(torch.logsumexp(logits, dim=-1) ** 2, token_mask)


def router_statistics(logits, probs, index, token_mask=None) -> dict:
    """A layer's router statistics from its `logits` [T, E] and `probs` = softmax(`logits`), all token means taken at
    once (one masked mean, one all-reduce under data parallelism; at decoding, where every op is overhead, half the
    time of one mean each):
    - `aux_loss`: `load_balancing_loss` of the selection `index` [T, k];
    - `z_loss`: ST-MoE's mean over tokens of logsumexp(z)^2;
    - `entropy_loss`: mean over tokens of -sum_i P_i log P_i (the top-p entropy loss, Huang et al. 2024 §2);
    - `expert_load` [E] (`expert_load`) and `mean_experts_per_token`."""
    num_experts = probs.shape[-1]
    selected = selection_mask(index, num_experts, probs.dtype)  # [T, E]
    # logsumexp(z) = z_i - log P_i for any i; at the argmax P_i >= 1/E, so the log is well conditioned, and the
    # gradient is still P. Cheaper than torch.logsumexp, which rescans the logits
    logsumexp = logits.amax(-1, keepdim=True) - probs.amax(-1, keepdim=True).log()  # [T, 1]
    z_squared = logsumexp.square()
    entropy = -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1, keepdim=True)  # [T, 1]
    per_token = torch.cat([probs, selected, z_squared, entropy, selected.sum(-1, keepdim=True)], dim=-1)
    mean_probs, load, z_loss, entropy_loss, experts_per_token = masked_mean(per_token, token_mask).split(
        [num_experts, num_experts, 1, 1, 1]
    )
    return {
        "aux_loss": num_experts * (load * mean_probs).sum(),
        "z_loss": z_loss[0],
        "entropy_loss": entropy_loss[0],
        "expert_load": load,
        "mean_experts_per_token": experts_per_token[0],
    }


def _token_count(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The tokens a statistic of `values` [T, ...] counts: the real ones, on every rank of `STATISTICS_GROUP`."""
    count = values.new_tensor(values.shape[0]) if token_mask is None else token_mask.sum().to(values.dtype)
    group = STATISTICS_GROUP.get()
    return count if group is None else distributed.all_reduce(count, group=group)


def mixtral_balance_loss(logits: list, loads: list, token_masks: list) -> torch.Tensor:
    """transformers' `load_balancing_loss_func` (Mixtral) over several layers: `E * sum_e f_e * mean_P_e`, with each
    layer's expert fractions `loads` [E] and softmax of `logits` [T_l, E] pooled over the non-padding tokens of all
    the layers (docs/topk.md §6, item 1)."""
    # each layer's token count (over STATISTICS_GROUP too, like its `loads` and the means below)
    counts = [_token_count(z, m) for z, m in zip(logits, token_masks)]
    total = sum(counts).clamp(min=1)
    fraction = sum(n * load for n, load in zip(counts, loads)) / total  # [E]
    mean_prob = sum(n * masked_mean(z.softmax(-1), m) for n, z, m in zip(counts, logits, token_masks)) / total
    return logits[0].shape[-1] * (fraction * mean_prob).sum()


def switch_balance_loss(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Switch Transformers' `load_balancing_loss_func` (HyperMoE's vendored copy) over one stack, its layers
    concatenated along the sequence axis: `logits` [B, S', E], `index` [B, S', k] after capacity drops. f and mean P
    per sequence, padding included, a dropped slot counting as expert 0 (the argmax of its empty row);
    `E * mean_b sum_e f_be * P_be` (docs/hypermoe.md §6, item 1)."""
    num_experts = logits.shape[-1]
    probs = logits.softmax(-1)
    routed = index.masked_fill(index == num_experts, 0)
    counts = torch.nn.functional.one_hot(routed, num_experts).amax(-2).to(probs.dtype)  # [B, S', E]
    return num_experts * masked_mean((counts.mean(1) * probs.mean(1)).sum(-1), None)  # mean over sequences
