"""Fused experts on transformers' experts contract (`@use_experts_implementation`).

All experts of a layer live in 3-D parameters ([E, out, in], docs/backbones.md §3), so transformers' `grouped_mm`
and `batched_mm` backends run them unchanged. The class's own forward is the `eager` backend: pairs sorted by expert,
then whichever is faster on the shape (docs/backbones.md §3): one `F.grouped_mm` call over all experts, or one plain
matmul per expert on views unbound once from each 3-D parameter, so that backward writes one gradient buffer instead
of one full [E, ...] buffer per expert (that indexing is the 1.3x backward penalty of transformers' `eager`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import (
    grouped_mm_experts_forward,
    use_experts_implementation,
)


@dataclass(frozen=True)
class FfnSpec:
    """Shape of one expert: the dense FFN it replaces, or an MH-MoE sub-token FFN."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    gated: bool  # act(gate(x)) * up(x), no bias: LLaMA, Mistral, Qwen, T5 gated-GELU
    bias: bool  # up and down projections with biases: BERT, RoBERTa, GPT-2
    dropout: float = 0.0  # inside the FFN, between activation and down projection (T5)

    def __post_init__(self):
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not a known activation; use one of {sorted(ACT2FN)}."
            )
        if self.hidden_size <= 0 or self.intermediate_size <= 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) and intermediate_size ({self.intermediate_size}) must be > 0."
            )
        if self.gated and self.bias:
            raise ValueError("gated experts with biases match no supported backbone; set gated=False or bias=False.")


# Measured crossover on CPU (benchmarks/README.md, "Experts path"): with up to ~256 rows per expert one grouped_mm
# call beats a matmul per expert (0.70-0.95x fwd+bwd); with more rows the per-expert matmuls win (up to 1.2x), and
# so they do once the one call's [P, 2I] intermediate outgrows the caches (MH-MoE's many narrow experts: 1.3x).
GROUPED_MM_MAX_ROWS_PER_EXPERT = 256
GROUPED_MM_MAX_INTERMEDIATE_BYTES = 64 * 2**20


class SortedLoopExperts(nn.Module):
    """Shared eager forward of the fused experts classes below.

    Pairs are sorted by expert and each expert's rows run either as one plain matmul per expert or, where that is
    faster (few rows per expert, `_grouped_mm_wins`), as one `F.grouped_mm` call over all experts. Sentinel slots
    (index == num_experts, weight 0: top-p padding, capacity drops) sort to the tail and are never computed. The host
    sync is one `.tolist()` of the per-expert counts; under torch.compile/export the forward is transformers'
    `grouped_mm` (static shapes, one graph).
    """

    def forward(self, hidden_states, top_k_index, top_k_weights):
        # hidden_states [T, H], top_k_index [T, k] (sentinel = num_experts), top_k_weights [T, k]
        if torch.compiler.is_compiling():  # the per-expert split below has data-dependent sizes
            return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        top_k = top_k_index.shape[1]
        expert_of_pair, pair_order = top_k_index.reshape(-1).sort(stable=True)  # [T*k]
        counts = torch.bincount(expert_of_pair, minlength=self.num_experts + 1)[: self.num_experts]  # [E]
        counts_list = counts.tolist()
        num_routed = sum(counts_list)
        output = torch.zeros_like(hidden_states)
        if num_routed == 0:
            return output
        pair_order = pair_order[:num_routed]
        token_of_pair = pair_order // top_k  # [P]
        # index_select, not [...]: its backward is index_add_, ~4x faster on CPU than indexing's index_put_
        routed = hidden_states.index_select(0, token_of_pair)  # [P, H], grouped by expert
        if self._grouped_mm_wins(routed):
            expert_output = self._grouped_experts(routed, counts, expert_of_pair[:num_routed])
        else:
            expert_output = self._looped_experts(routed, counts_list)
        weights = top_k_weights.reshape(-1).index_select(0, pair_order).to(hidden_states.dtype)  # [P]
        return output.index_add_(0, token_of_pair, expert_output * weights[:, None])

    def _grouped_mm_wins(self, routed) -> bool:
        """Whether one `F.grouped_mm` call is the faster way to run these [P, H] rows (and the kernel takes them)."""
        weights = (self.gate_up_proj if self.has_gate else self.up_proj, self.down_proj)
        if routed.device.type == "cuda":  # the grouped kernel is bf16-only and needs compute capability 8.0
            return routed.dtype == torch.bfloat16 and torch.cuda.get_device_capability(routed.device) >= (8, 0)
        intermediate_bytes = routed.shape[0] * weights[0].shape[1] * routed.element_size()
        return (
            routed.device.type == "cpu"
            and routed.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and routed.shape[0] <= GROUPED_MM_MAX_ROWS_PER_EXPERT * self.num_experts
            and intermediate_bytes <= GROUPED_MM_MAX_INTERMEDIATE_BYTES
            and all(w.data_ptr() % 16 == 0 for w in weights)
            and all(size * routed.element_size() % 16 == 0 for w in weights for size in w.shape[1:])  # row strides
        )

    def _grouped_experts(self, routed, counts, expert_of_pair):
        # routed [P, H] grouped by expert, counts [E], expert_of_pair [P]
        offsets = counts.cumsum(0, dtype=torch.int32)  # [E]: end row of each expert's group
        first = self.gate_up_proj if self.has_gate else self.up_proj  # [E, out, in]
        hidden = F.grouped_mm(routed, first.transpose(-2, -1), offs=offsets)  # [P, 2I] or [P, I]
        if self.has_bias:
            hidden = hidden + self.up_proj_bias.index_select(0, expert_of_pair)
        hidden = self._apply_gate(hidden) if self.has_gate else self.act_fn(hidden)
        output = F.grouped_mm(hidden, self.down_proj.transpose(-2, -1), offs=offsets)  # [P, H]
        return output + self.down_proj_bias.index_select(0, expert_of_pair) if self.has_bias else output

    def _looped_experts(self, routed, counts):
        # one matmul per expert on views unbound once: backward writes one gradient buffer per parameter
        first = (self.gate_up_proj if self.has_gate else self.up_proj).unbind(0)
        first_bias = self.up_proj_bias.unbind(0) if self.has_bias else None
        down = self.down_proj.unbind(0)
        down_bias = self.down_proj_bias.unbind(0) if self.has_bias else None
        pieces = []
        for expert, chunk in enumerate(routed.split(counts)):
            if chunk.shape[0] == 0:
                continue
            hidden = F.linear(chunk, first[expert], first_bias[expert] if self.has_bias else None)
            hidden = self._apply_gate(hidden) if self.has_gate else self.act_fn(hidden)
            pieces.append(F.linear(hidden, down[expert], down_bias[expert] if self.has_bias else None))
        return torch.cat(pieces)

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)  # gate rows first
        return self.inner_dropout(self.act_fn(gate) * up)

    def _set_activation(self, ffn: FfnSpec):
        # transformers' backends call `_apply_gate` (gated) or `act_fn` (non-gated): both must include the dropout
        self.inner_dropout = nn.Dropout(ffn.dropout)
        self.act_fn = ACT2FN[ffn.hidden_act]
        if not ffn.gated and ffn.dropout > 0:
            self.act_fn = nn.Sequential(self.act_fn, self.inner_dropout)

    @torch.no_grad()
    def reset_parameters(self):
        for name, param in self.named_parameters(recurse=False):
            if name.endswith("_bias"):
                init.zeros_(param)
            else:
                init.normal_(param, std=self.config.initializer_range)


@use_experts_implementation(has_gate=True, has_bias=False)
class GatedExperts(SortedLoopExperts):
    """SwiGLU-style experts: `gate_up_proj` [E, 2I, H] (gate rows first), `down_proj` [E, H, I]."""

    def __init__(self, config, ffn: FfnSpec, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn.intermediate_size, ffn.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, ffn.hidden_size, ffn.intermediate_size))
        self._set_activation(ffn)


@use_experts_implementation(has_gate=False, has_bias=True)
class BiasedExperts(SortedLoopExperts):
    """BERT/GPT-2-style experts: `up_proj` [E, I, H] + `up_proj_bias` [E, I], `down_proj` [E, H, I] + bias [E, H]."""

    def __init__(self, config, ffn: FfnSpec, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn.intermediate_size, ffn.hidden_size))
        self.up_proj_bias = nn.Parameter(torch.empty(num_experts, ffn.intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, ffn.hidden_size, ffn.intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, ffn.hidden_size))
        self._set_activation(ffn)


@use_experts_implementation(has_gate=False, has_bias=False)
class PlainExperts(SortedLoopExperts):
    """T5-ReLU-style experts without biases: `up_proj` [E, I, H], `down_proj` [E, H, I]."""

    def __init__(self, config, ffn: FfnSpec, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn.intermediate_size, ffn.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, ffn.hidden_size, ffn.intermediate_size))
        self._set_activation(ffn)


def build_experts(config, ffn: FfnSpec, num_experts: int) -> SortedLoopExperts:
    """The fused experts class for `ffn`, dispatching on `config._experts_implementation`.

    `config` must be the model's own config object so that runtime switching reaches the experts.
    """
    cls = GatedExperts if ffn.gated else BiasedExperts if ffn.bias else PlainExperts
    experts = cls(config, ffn, num_experts)
    # transformers' grouped_mm/batched_mm zero the sentinel rows only under expert parallelism
    # (docs/backbones.md §3); without this flag NaN*0 from uninitialised rows can leak into the output.
    experts._is_expert_parallel = True
    experts.reset_parameters()
    return experts
