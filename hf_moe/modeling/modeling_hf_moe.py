"""Model classes of the five families: a transformers dense backbone (any head) whose FFN blocks in `moe_layers` are
replaced by the family's MoE layer. Attention, embeddings, norms, KV cache and attention backends stay transformers'.

Classes are named `<Family><Head>` (e.g. `HyperMoeForSequenceClassification`). Every head adds
`router_aux_loss_coef * aux_loss` (+ z-loss and entropy terms) to the task loss and returns `aux_loss`, and with
`output_router_logits=True` the router logits of every MoE layer (transformers' generic MoE classification heads
drop both, transformers-v5.md §2).

The experts classes are decorated with `@use_experts_implementation` in `experts.py`; this file overrides
`_can_set_experts_implementation` instead of relying on transformers' source-text check.
"""

import dataclasses
import functools
import os

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GenerationMixin,
    PreTrainedModel,
)

from .backbones import get_adapter
from .configuration_hf_moe import (
    DynamicMoeConfig,
    HyperMoeConfig,
    HyperRouterConfig,
    MultiHeadMoeConfig,
    TopKMoeConfig,
)
from .experts import SortedLoopExperts
from .moe_dynamic import DynamicMoeLayer
from .moe_hypermoe import HyperExpertGenerator, HyperMoeLayer
from .moe_hyperrouter import HyperRouterGate, HyperRouterLayer
from .moe_mh import MultiHeadMoeLayer
from .moe_topk import Router, TopKMoeLayer

# modules whose initialisation differs from the backbone's generic one (re-applied after it, skipping loaded tensors)
# each initialises only its own direct parameters in `reset_parameters`, with guarded (skip-if-loaded) init functions
CUSTOM_INIT_MODULES = (Router, SortedLoopExperts, HyperMoeLayer, HyperExpertGenerator, HyperRouterGate, MultiHeadMoeLayer)


class MoeFeedForward(nn.Module):
    """Stands in a backbone layer's FFN slot: runs the MoE layer on the current padding mask, keeps its
    `MoeLayerOutput` for the model to collect, and returns hidden states as the dense FFN did."""

    def __init__(self, moe: TopKMoeLayer, stack: str, dropout: float = 0.0):
        super().__init__()
        self.moe = moe
        self.stack = stack
        self.dropout = nn.Dropout(dropout)
        self.padding_mask = None  # [..., S_total], set by the model around each forward
        self.layer_output = None

    def forward(self, hidden_states):
        # hidden_states [B, S, H]; during cached decoding the mask also covers past tokens, so keep its last S columns
        mask = self.padding_mask
        if mask is not None:
            mask = mask.reshape(-1, mask.shape[-1])[:, -hidden_states.shape[-2] :]
        self.layer_output = self.moe(hidden_states, mask)
        return self.dropout(self.layer_output.hidden_states)


class _StackGenerator:
    """The HyperMoE generator of a stack, looked up at every call: PEFT's `modules_to_save` replaces the module in
    the model's `hyper_generators` with a trainable copy, and the layers must call that copy."""

    def __init__(self, generators: nn.ModuleDict, stack: str):
        self.generators, self.stack = generators, stack

    def __call__(self, *args):
        return self.generators[self.stack](*args)


@functools.cache
def _output_class_with_router_fields(output_class):
    """`output_class` (e.g. SequenceClassifierOutput) extended with `aux_loss` and `router_logits`."""
    return dataclasses.make_dataclass(
        f"Moe{output_class.__name__}",
        [
            ("aux_loss", torch.Tensor | None, dataclasses.field(default=None)),
            ("router_logits", tuple | None, dataclasses.field(default=None)),
        ],
        bases=(output_class,),
        namespace={"__module__": __name__},
    )


class MoePreTrainedModel(PreTrainedModel):
    """Shared machinery; a family sets `config_class` and `layer_class`, a head sets `auto_class`."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    layer_class = TopKMoeLayer
    auto_class = AutoModel

    def __init__(self, config):
        super().__init__(config)
        text_config = config.text_config
        for name in ("id2label", "label2id", "problem_type"):  # task fields live on the wrapper config
            setattr(text_config, name, getattr(config, name))
        # the backbone classes cannot set an experts implementation; only our experts read it, from `config`
        text_config._experts_implementation_internal = None
        if type(text_config) not in self.auto_class._model_mapping:
            raise ValueError(
                f"{type(self).__name__} needs a {text_config.model_type} model for {self.auto_class.__name__}, "
                "which transformers does not have; pick another head or backbone."
            )
        backbone = self.auto_class.from_config(text_config)
        if self.auto_class is AutoModel:
            # base models keep the backbone under `model.<prefix>.` as the heads do (`model.bert.…`, `model.model.…`),
            # so one checkpoint loads into every head, as a dense base checkpoint does in transformers
            self.model = nn.Module()
            setattr(self.model, backbone.base_model_prefix, backbone)
            # transformers collects tied weights (T5's shared embeddings) only from PreTrainedModel children
            self.model.all_tied_weights_keys = {
                f"{backbone.base_model_prefix}.{target}": f"{backbone.base_model_prefix}.{source}"
                for target, source in backbone.all_tied_weights_keys.items()
            }
        else:
            self.model = backbone
        self.backbone_prefix = backbone.base_model_prefix if self.auto_class is AutoModel else None
        self._no_split_modules = backbone._no_split_modules
        self.hyper_generators = self._install_moe_layers()
        self.post_init()

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether `Trainer` passes `num_items_in_batch` and then skips its own averaging over accumulation steps and
        processes. True for the causal-LM heads only, whose backbone losses divide their summed token loss by it.
        Every other backbone head ignores it and returns its micro-batch mean, which Trainer must then average (read
        from our `**kwargs` forward, Trainer would scale those gradients by accumulation steps x processes)."""
        return self.auto_class is AutoModelForCausalLM

    @property
    def is_gradient_checkpointing(self) -> bool:
        # PEFT (0.21) still reads this alias, which transformers 5 deprecated with a FutureWarning on every LoRA wrap
        return self.is_activation_checkpointing

    @property
    def backbone(self) -> PreTrainedModel:
        """The transformers model (any head) whose FFNs were replaced."""
        return getattr(self.model, self.backbone_prefix) if self.backbone_prefix else self.model

    def _install_moe_layers(self) -> nn.ModuleDict:
        config = self.config
        adapter = get_adapter(config.text_config.model_type)
        ffn = adapter.ffn_spec(config.text_config)
        generators = nn.ModuleDict()
        for stack, layers in adapter.stacks(self.backbone).items():
            extra = ()
            if self.layer_class is HyperMoeLayer:  # one generator per stack (methods.md §2.3)
                generators[stack] = HyperExpertGenerator(config, ffn.hidden_size, len(layers))
                extra = (_StackGenerator(generators, stack),)
            for idx, layer in enumerate(layers):
                if config.is_moe_layer(idx):
                    moe = self.layer_class(config, ffn, idx, *extra).train(layer.training)
                    adapter.install(layer, MoeFeedForward(moe, stack, adapter.block_dropout(config.text_config)))
        return generators

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts):
        # our eager path (sorted loop over experts) reaches the dense floor on CPU (transformers-v5.md §8)
        return super().get_correct_experts_implementation(requested_experts or "eager")

    def initialize_weights(self):
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, CUSTOM_INIT_MODULES):
                module.reset_parameters()

    def moe_blocks(self) -> list[MoeFeedForward]:
        return [m for m in self.modules() if isinstance(m, MoeFeedForward)]

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.backbone.set_output_embeddings(value)

    def get_encoder(self, *args, **kwargs):
        for block in self.moe_blocks():  # generate() runs the encoder outside `forward`: no padding mask known
            block.padding_mask = None
        return self.backbone.get_encoder(*args, **kwargs)

    def get_decoder(self, *args, **kwargs):
        return self.backbone.get_decoder(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
            "labels": labels,
            "start_positions": start_positions,
            "end_positions": end_positions,
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        inputs = {name: value for name, value in inputs.items() if value is not None}
        blocks = self.moe_blocks()
        encoder_decoder = self.config.text_config.is_encoder_decoder
        for block in blocks:
            # the mask stays set after the forward: gradient checkpointing re-runs the blocks during backward
            block.layer_output = None
            block.padding_mask = decoder_attention_mask if encoder_decoder and block.stack == "decoder" else attention_mask
        outputs = self.backbone(**inputs, **kwargs, return_dict=True)
        layer_outputs = [block.layer_output for block in blocks if block.layer_output is not None]
        if torch.is_grad_enabled() and any(
            not b.layer_output.router_logits.requires_grad and any(p.requires_grad for p in b.moe.router.parameters())
            for b in blocks
            if b.layer_output is not None
        ):
            raise ValueError(
                "The router losses have no gradient: reentrant gradient checkpointing runs the MoE layers without "
                "grad. Enable it with gradient_checkpointing_kwargs={'use_reentrant': False} (the default)."
            )
        output = _output_class_with_router_fields(type(outputs))(**outputs)
        if layer_outputs:
            output.aux_loss = sum(o.aux_loss for o in layer_outputs)
            if getattr(output, "loss", None) is not None:
                output.loss = output.loss + self.router_loss(layer_outputs, output.aux_loss, labels, **kwargs)
            if output_router_logits if output_router_logits is not None else self.config.output_router_logits:
                output.router_logits = tuple(o.router_logits for o in layer_outputs)
        return output if return_dict is not False else output.to_tuple()

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if not os.path.exists(os.path.join(save_directory, "README.md")):
            self.write_model_card(save_directory)

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        # `push_to_hub` saves transformers' generic template card last; replace it with ours (a real card is kept)
        card_path = os.path.join(working_dir, "README.md")
        if not os.path.exists(card_path) or "automatically generated" in open(card_path, encoding="utf-8").read():
            self.write_model_card(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def write_model_card(self, directory, extra: str = ""):
        """README.md: family, backbone, experts, MoE layers, total and active parameters, and how to load."""
        config, text_config = self.config, self.config.text_config
        total = sum(p.numel() for p in self.parameters())
        experts = sum(p.numel() for m in self.modules() if isinstance(m, SortedLoopExperts) for p in m.parameters())
        top_k, num_experts = config.num_experts_per_tok, config.num_experts
        if config.model_type == "dynamic_moe":
            active = f"data-dependent (top-p {config.router_top_p}); {total - experts * (1 - 1 / num_experts):,.0f} at one expert"
        else:
            active = f"{total - experts * (1 - top_k / num_experts):,.0f}"
        blocks = self.moe_blocks()
        runs = []  # the MoE layers as ranges of consecutive indices: "0-5", "1, 3, 5"
        for idx in sorted(block.moe.layer_idx for block in blocks if block.stack == blocks[0].stack):
            if runs and idx == runs[-1][1] + 1:
                runs[-1][1] = idx
            else:
                runs.append([idx, idx])
        moe_layers = ", ".join(f"{first}-{last}" if last > first else f"{first}" for first, last in runs)
        head, auto_class = type(self).__name__, self.auto_class.__name__
        card = f"""---
library_name: transformers
tags:
- hf-moe
- mixture-of-experts
- {config.model_type}
---

# {head}

A `{config.model_type}` mixture-of-experts model (`{head}`) over a `{text_config.model_type}` backbone, built with
[hf-moe](https://pypi.org/project/hf-moe/).

| family | backbone | experts | experts per token | MoE layers | total parameters | active parameters |
|---|---|---|---|---|---|---|
| {config.model_type} | {text_config.model_type} | {num_experts} | {top_k if config.model_type != "dynamic_moe" else f"top-p {config.router_top_p}"} | {moe_layers} | {total:,} | {active} |

## How to load

With hf-moe installed (`pip install hf-moe`), importing it registers the family with transformers:

```python
import hf_moe
from transformers import {auto_class}

model = {auto_class}.from_pretrained("<this repository or folder>")
```

Without hf-moe, the modeling code saved with this model is used:

```python
from transformers import {auto_class}

model = {auto_class}.from_pretrained("<this repository or folder>", trust_remote_code=True)
```
"""
        card += f"\n{extra}" if extra else ""
        with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)

    def router_loss(self, layer_outputs, aux_loss, labels=None, num_items_in_batch=None, shift_labels=None, **kwargs):
        """router_aux_loss_coef * aux_loss + z-loss and (top-p) entropy terms, each summed over MoE layers.

        When `Trainer` passes `num_items_in_batch` (causal-LM heads, see `accepts_loss_kwargs`), the task loss is
        this micro-batch's token sum over the step's predicted tokens (all micro-batches and processes), and Trainer
        neither averages the micro-batches nor the processes. The router term is then weighted by this micro-batch's
        share of those tokens, counted as Trainer counts them, so the weights of a step sum to one: the configured
        weight holds at any accumulation and process count, and equals the plain mean over micro-batches when they
        predict equally many tokens. (Trainer tells the model nothing else, so a plain mean over micro-batches of
        unequal token counts cannot be formed here.)"""
        config = self.config
        loss = config.router_aux_loss_coef * aux_loss
        if config.router_z_loss_coef:
            loss = loss + config.router_z_loss_coef * sum(o.z_loss for o in layer_outputs)
        if getattr(config, "router_entropy_loss_coef", 0):
            loss = loss + config.router_entropy_loss_coef * sum(o.entropy_loss for o in layer_outputs)
        if num_items_in_batch is not None and self.accepts_loss_kwargs:
            predicted = shift_labels if shift_labels is not None else labels[..., 1:]
            loss = loss * predicted.ne(-100).sum() / num_items_in_batch
        return loss


FAMILIES = {
    "TopKMoe": (TopKMoeConfig, TopKMoeLayer),
    "HyperMoe": (HyperMoeConfig, HyperMoeLayer),
    "HyperRouter": (HyperRouterConfig, HyperRouterLayer),
    "MultiHeadMoe": (MultiHeadMoeConfig, MultiHeadMoeLayer),
    "DynamicMoe": (DynamicMoeConfig, DynamicMoeLayer),
}

HEADS = {
    "Model": AutoModel,
    "ForCausalLM": AutoModelForCausalLM,
    "ForMaskedLM": AutoModelForMaskedLM,
    "ForSequenceClassification": AutoModelForSequenceClassification,
    "ForTokenClassification": AutoModelForTokenClassification,
    "ForQuestionAnswering": AutoModelForQuestionAnswering,
    "ForMultipleChoice": AutoModelForMultipleChoice,
    "ForConditionalGeneration": AutoModelForSeq2SeqLM,
}
_GENERATIVE_HEADS = ("ForCausalLM", "ForConditionalGeneration")

FAMILY_BY_MODEL_TYPE = {config_class.model_type: family for family, (config_class, _) in FAMILIES.items()}
FAMILY_CONFIG_CLASSES = {config_class.model_type: config_class for config_class, _ in FAMILIES.values()}

MODEL_CLASSES = {}  # (family, head) -> class
for _family, (_config_class, _layer_class) in FAMILIES.items():
    _config_class.register_for_auto_class()  # saved checkpoints carry this code and an `auto_map`
    for _head, _auto_class in HEADS.items():
        _bases = (MoePreTrainedModel, GenerationMixin) if _head in _GENERATIVE_HEADS else (MoePreTrainedModel,)
        _cls = type(
            f"{_family}{_head}",
            _bases,
            {
                "__module__": __name__,
                "__doc__": f"{_family} MoE over a dense backbone's `{_auto_class.__name__}` model.",
                "config_class": _config_class,
                "layer_class": _layer_class,
                "auto_class": _auto_class,
            },
        )
        _cls.register_for_auto_class(_auto_class.__name__)
        globals()[_cls.__name__] = MODEL_CLASSES[_family, _head] = _cls

__all__ = ["MoePreTrainedModel", "MoeFeedForward", "MODEL_CLASSES"] + [cls.__name__ for cls in MODEL_CLASSES.values()]
