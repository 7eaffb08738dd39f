"""One small adapter per dense backbone: the shape of its FFN, where the FFN lives, and how its weights map onto one
expert in the fused layout. Adding a backbone is one `BackboneAdapter` entry in `ADAPTERS`.

`stacks` receives the transformers model built from the backbone config (any head) and returns its layers per stack;
`install` puts the MoE block into one layer in place of the dense FFN; `dense_ffn_weights` reads a dense layer's FFN as
one expert (no expert axis): `gate_up_proj` [2I, H] + `down_proj` [H, I] for gated FFNs, else `up_proj` [I, H],
`down_proj` [H, I] and, with biases, `up_proj_bias` [I], `down_proj_bias` [H].
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .experts import FfnSpec


@dataclass(frozen=True)
class BackboneAdapter:
    ffn_spec: Callable  # text_config -> FfnSpec
    stacks: Callable  # transformers model -> {"encoder" | "decoder": [layer, ...]}
    install: Callable  # (layer, block) -> None
    dense_ffn_weights: Callable  # dense layer -> {name: tensor}
    attention_modules: tuple[str, ...]  # names of the attention projections (PEFT's `target_modules`)
    block_dropout: Callable = lambda config: 0.0  # dropout the replaced FFN applied to its own output (GPT-2)


# BERT, RoBERTa: the whole MoE sits in `intermediate`; `output` keeps its dropout, residual and LayerNorm.
# The MoE block runs on whole sequences (`chunk_size_feed_forward` off): the router statistics (balance loss = a
# product of means over all tokens) and capacity need every token at once, and the experts already hold only their
# routed tokens' activations, which is the memory feed-forward chunking saves.
def _bert_install(layer, block):
    layer.intermediate = block
    layer.output.dense = nn.Identity()
    layer.chunk_size_feed_forward = 0


BERT = BackboneAdapter(
    ffn_spec=lambda c: FfnSpec(c.hidden_size, c.intermediate_size, c.hidden_act, gated=False, bias=True),
    stacks=lambda model: {"encoder": list(model.base_model.encoder.layer)},
    install=_bert_install,
    dense_ffn_weights=lambda layer: {
        "up_proj": layer.intermediate.dense.weight,
        "up_proj_bias": layer.intermediate.dense.bias,
        "down_proj": layer.output.dense.weight,
        "down_proj_bias": layer.output.dense.bias,
    },
    attention_modules=("query", "key", "value"),
)


# GPT-2: Conv1D stores weights as [in, out]; the MLP applies `resid_pdrop` dropout to its own output.
def _gpt2_install(layer, block):
    layer.mlp = block


GPT2 = BackboneAdapter(
    ffn_spec=lambda c: FfnSpec(c.n_embd, c.n_inner or 4 * c.n_embd, c.activation_function, gated=False, bias=True),
    stacks=lambda model: {"decoder": list(model.base_model.h)},
    install=_gpt2_install,
    dense_ffn_weights=lambda layer: {
        "up_proj": layer.mlp.c_fc.weight.t(),
        "up_proj_bias": layer.mlp.c_fc.bias,
        "down_proj": layer.mlp.c_proj.weight.t(),
        "down_proj_bias": layer.mlp.c_proj.bias,
    },
    attention_modules=("c_attn",),
    block_dropout=lambda c: c.resid_pdrop,
)


# LLaMA, Mistral, Qwen2, Qwen3: SwiGLU `mlp` with gate_proj, up_proj, down_proj and no bias.
def _llama_ffn_spec(c):
    if getattr(c, "mlp_bias", False):
        raise ValueError(f"{c.model_type} with mlp_bias=True is not supported: hf-moe's gated experts have no bias.")
    return FfnSpec(c.hidden_size, c.intermediate_size, c.hidden_act, gated=True, bias=False)


LLAMA = BackboneAdapter(
    ffn_spec=_llama_ffn_spec,
    stacks=lambda model: {"decoder": list(model.base_model.layers)},
    install=_gpt2_install,
    dense_ffn_weights=lambda layer: {
        "gate_up_proj": torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
        "down_proj": layer.mlp.down_proj.weight,
    },
    attention_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
)


# T5: `layer[-1].DenseReluDense` (ReLU wi/wo, or gated-GELU wi_0/wi_1/wo), dropout between activation and wo.
def _t5_stacks(model):
    base = model.base_model
    stacks = {"encoder": list(base.encoder.block)}
    if getattr(base, "decoder", None) is not None:
        stacks["decoder"] = list(base.decoder.block)
    return stacks


def _t5_install(layer, block):
    layer.layer[-1].DenseReluDense = block


def _t5_dense_ffn_weights(layer):
    ffn = layer.layer[-1].DenseReluDense
    if hasattr(ffn, "wi_0"):
        return {"gate_up_proj": torch.cat([ffn.wi_0.weight, ffn.wi_1.weight]), "down_proj": ffn.wo.weight}
    return {"up_proj": ffn.wi.weight, "down_proj": ffn.wo.weight}


T5 = BackboneAdapter(
    ffn_spec=lambda c: FfnSpec(
        c.d_model, c.d_ff, c.dense_act_fn, gated=c.is_gated_act, bias=False, dropout=c.dropout_rate
    ),
    stacks=_t5_stacks,
    install=_t5_install,
    dense_ffn_weights=_t5_dense_ffn_weights,
    attention_modules=("q", "k", "v", "o"),
)


ADAPTERS = {
    "bert": BERT,
    "roberta": BERT,
    "gpt2": GPT2,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "t5": T5,
}


def get_adapter(model_type: str) -> BackboneAdapter:
    if model_type not in ADAPTERS:
        raise ValueError(
            f"Backbone model_type {model_type!r} is not supported; supported backbones: {', '.join(ADAPTERS)}."
        )
    return ADAPTERS[model_type]
