"""Model classes of the five families: a transformers dense backbone (any head) whose FFN blocks in `moe_layers` are
replaced by the family's MoE layer. Attention, embeddings, norms, KV cache and attention backends stay transformers'.

Classes are named `<Family><Head>` (e.g. `HyperMoeForSequenceClassification`), declared in modeling_families.py
(generated from the family registry, registry.py, and `HEADS` below by utils/generate_model_classes.py). Every head adds
`router_aux_loss_coef * aux_loss` (+ z-loss and entropy terms) to the task loss and returns `aux_loss`, and with
`output_router_logits=True` the router logits of every MoE layer (transformers' generic MoE classification heads
drop both, docs/topk.md §3).

The experts classes are decorated with `@use_experts_implementation` in `experts.py`; this file overrides
`_can_set_experts_implementation` instead of relying on transformers' source-text check.
"""

import dataclasses
import functools
import os
import re

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)
from transformers.core_model_loading import WeightRenaming
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils.output_capturing import CompileableContextVar

from .backbones import get_adapter
from .experts import SortedLoopExperts
from .modeling_outputs import MOE_OUTPUT_CLASSES
from .registry import MoeFamily, get_family
from .routing import STATISTICS_GROUP
from .topk_moe import TopKMoeLayer, pooled_router_losses


@dataclasses.dataclass
class RoutingContext:
    """What the MoE blocks of one forward share: each stack's per-token padding mask (`token_padding_mask`) and the
    list each block appends `(stack, MoeLayerOutput)` to (None: record nothing, as when checkpointing recomputes a
    layer). The forward of the model called first owns it (a head's, whose dense forward then calls `base_model`,
    which runs in it); nothing is stored on the modules, so concurrent forwards do not mix."""

    padding_masks: dict[str, torch.Tensor | None]
    layer_outputs: list | None
    base_model: nn.Module | None = None


# the routing context of the forward running in this thread (a plain global while torch.compile traces)
_ROUTING_CONTEXT = CompileableContextVar("hf_moe_routing_context")


def token_padding_mask(attention_mask, cache=None) -> torch.Tensor | None:
    """[B, S'] bool, True for real tokens, whose last S columns are the S current tokens, from any mask transformers
    accepts: 2-D [B, S_kv] (or [B, C, S_kv] for multiple choice), 4-D [B, 1 | heads, q, kv] bool (True = attend) or
    additive float (0 = attend), a dict of 4-D masks per attention type (generate), or None (no padding)."""
    if isinstance(attention_mask, dict):  # every attention type agrees on whether a token may attend to itself
        attention_mask = next(iter(attention_mask.values()), None)
    if not isinstance(attention_mask, torch.Tensor):  # no mask, or a flex-attention BlockMask: every token routed
        return None
    if attention_mask.dim() != 4:
        return attention_mask.reshape(-1, attention_mask.shape[-1]).bool()
    # a token is real iff it may attend to itself: query i sits at key position past + i (a static cache's keys
    # span its whole length, so `past` comes from the cache)
    query_len, key_len = attention_mask.shape[-2:]
    past = cache.get_seq_length() if cache is not None else key_len - query_len
    own_key = torch.arange(query_len, device=attention_mask.device) + past
    own = attention_mask[:, 0].gather(-1, own_key.expand(attention_mask.shape[0], -1)[..., None])[..., 0]  # [B, q]
    return own if own.dtype == torch.bool else own == 0


def _checkpoint_in_routing_context(checkpoint_function, function, *args, **kwargs):
    """`checkpoint_function(function, ...)` whose recomputation during backward (outside the forward) runs in the
    routing context of the forward, recording nothing: the MoE layers see the same padding masks and take their
    statistics over the same ranks again."""
    context, group = _ROUTING_CONTEXT.get(), STATISTICS_GROUP.get()
    calls = 0

    def run(*run_args, **run_kwargs):
        nonlocal calls
        calls += 1
        if calls == 1 or context is None:
            return function(*run_args, **run_kwargs)
        token = _ROUTING_CONTEXT.set(RoutingContext(context.padding_masks, layer_outputs=None))
        group_token = STATISTICS_GROUP.set(group)
        try:
            return function(*run_args, **run_kwargs)
        finally:
            STATISTICS_GROUP.reset(group_token)
            _ROUTING_CONTEXT.reset(token)

    return checkpoint_function(run, *args, **kwargs)


class MoeFeedForward(nn.Module):
    """Stands in a backbone layer's FFN slot: runs the MoE layer on the padding mask of the current forward's routing
    context, appends its `MoeLayerOutput` there, and returns hidden states as the dense FFN did."""

    def __init__(self, moe: TopKMoeLayer, stack: str, dropout: float = 0.0):
        super().__init__()
        self.moe = moe
        self.stack = stack
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states):
        # hidden_states [B, S, H]; outside a forward of the model (generate() runs T5's encoder alone) no mask is known
        context = _ROUTING_CONTEXT.get()
        mask = None if context is None else context.padding_masks[self.stack]
        if mask is not None:  # during cached decoding the mask also covers past tokens
            mask = mask[:, -hidden_states.shape[-2] :]
        output = self.moe(hidden_states, mask)
        if context is not None and context.layer_outputs is not None:
            context.layer_outputs.append((self.stack, output))
        return self.dropout(output.hidden_states)


def _checkpoint_keys(state_dict, checkpoint_files) -> list[str]:
    """The tensor names of a checkpoint being loaded (safetensors files are read for their headers only)."""
    if state_dict is not None:
        return list(state_dict)
    keys = []
    for path in checkpoint_files or []:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                keys += f.keys()
    return keys


def _names_parameters(rule: str, parameters: list[str]) -> bool:
    """Whether a parallel-plan rule (`layers.*.self_attn.q_proj`) names some parameter or a module holding one."""
    pattern = re.compile(re.escape(rule).replace(r"\*", r"\d+") + r"(\..+)?")
    return any(pattern.fullmatch(name) for name in parameters)


def _unwrapped_class(cls: type) -> type:
    """`cls`, or the class FSDP2's `fully_shard` subclassed to make it (the first of its bases outside torch)."""
    return next(base for base in cls.__mro__ if not base.__module__.startswith("torch."))


def _experts_rules(model) -> dict:
    """Parallel-plan rule (`...layers.*.mlp.moe.experts`) -> one experts module it names, for every MoE layer."""
    rules = {}
    for name, module in model.named_modules():
        if isinstance(module, SortedLoopExperts):
            rules.setdefault(re.sub(r"\.\d+(?=\.)", ".*", name), module)
    return rules


class _StackModule:
    """A family's per-stack module (HyperMoE's generator), looked up at every call: PEFT's `modules_to_save` replaces
    the module in the model's `hyper_generators` with a trainable copy, and the layers must call that copy."""

    def __init__(self, modules: nn.ModuleDict, stack: str):
        self.modules, self.stack = modules, stack

    def __call__(self, *args):
        return self.modules[self.stack](*args)


# what transformers reads from a model class about its keys and devices, taken over from the dense model
_DENSE_MODEL_ATTRIBUTES = (
    "_tied_weights_keys",
    "_keep_in_fp32_modules",
    "_keep_in_fp32_modules_strict",
    "_no_split_modules",
    "_skip_keys_device_placement",
    "_keys_to_ignore_on_load_unexpected",
    "_keys_to_ignore_on_load_missing",
    "_keys_to_ignore_on_save",
)


class MoePreTrainedModel(PreTrainedModel):
    """Shared machinery; a family sets `config_class` and `layer_class`, a head sets `auto_class` and
    `base_model_class` (the family's `<Family>Model`).

    A model takes the place of the dense transformers model of its `auto_class` (`backbone`) with the same children,
    so its state-dict keys are the dense model's (`model.layers.0...`, `lm_head.weight`); the dense model's base
    model (`model`, `bert`, `transformer`) becomes our `<Family>Model` over it, which holds the MoE layers and what a
    stack shares (HyperMoE's `hyper_generators`). `base_model_prefix` is the dense model's.
    """

    base_model_prefix = "model"
    base_model_class = None
    supports_gradient_checkpointing = True
    _can_compile_fullgraph = True  # with any experts implementation: `eager` runs `grouped_mm` while compiling
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    layer_class = TopKMoeLayer
    auto_class = AutoModel

    def __init__(self, config, dense: PreTrainedModel | None = None):
        """`dense`: the transformers model this one takes the place of, built from `config.text_config` with
        `auto_class` when None (a head passes its own dense model's base model to its `base_model_class`)."""
        super().__init__(config)
        text_config = config.text_config
        for name in ("id2label", "label2id", "problem_type"):  # task fields live on the wrapper config
            setattr(text_config, name, getattr(config, name))
        # the backbone classes cannot set an experts implementation; only our experts read it, from `config`
        text_config._experts_implementation_internal = None
        if dense is None:
            if type(text_config) not in self.auto_class._model_mapping:
                raise ValueError(
                    f"{type(self).__name__} needs a {text_config.model_type} model for {self.auto_class.__name__}, "
                    "which transformers does not have; pick another head or backbone."
                )
            dense = self.auto_class.from_config(text_config)
        self._take_place_of(dense)
        if self.base_model is self:  # a head's base model holds the MoE layers and the stack modules
            self.hyper_generators = self._install_moe_layers()
        self.post_init()

    def _take_place_of(self, dense: PreTrainedModel):
        """Hold `dense`'s children under their names (so the state-dict keys are the dense model's, plus the MoE
        layers'), with its base model, if it has one, replaced by our base model over it. `dense` keeps running its
        own forward on them: it shares this model's module, parameter and buffer tables, so a module PEFT or
        accelerate swaps in here is the one its forward calls."""
        self.base_model_prefix = dense.base_model_prefix
        dense_base = getattr(dense, dense.base_model_prefix, None)
        for name, child in dense.named_children():
            self.add_module(name, self.base_model_class(self.config, child) if child is dense_base else child)
        self._parameters.update(dense._parameters)
        self._buffers.update(dense._buffers)
        self._non_persistent_buffers_set |= dense._non_persistent_buffers_set
        dense._modules, dense._parameters, dense._buffers = self._modules, self._parameters, self._buffers
        dense._non_persistent_buffers_set = self._non_persistent_buffers_set
        self.__dict__["backbone"] = dense  # unregistered: its modules are this model's
        for name in _DENSE_MODEL_ATTRIBUTES:
            setattr(self, name, getattr(dense, name))

    @property
    def family(self) -> MoeFamily:
        """The family's registry record (registry.py)."""
        return get_family(self.config.model_type)

    @property
    def init_module_types(self) -> tuple[type, ...]:
        """Module classes whose own `reset_parameters` initialises their parameters: the experts and the family's."""
        return (SortedLoopExperts, *self.family.init_modules)

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

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, every_n_layers=1):
        checkpoint_function = functools.partial(_checkpoint_in_routing_context, gradient_checkpointing_func)
        super()._set_gradient_checkpointing(enable, checkpoint_function, every_n_layers)

    def _install_moe_layers(self) -> nn.ModuleDict:
        """Replace the FFN of every MoE layer of every stack; returns the family's per-stack modules, if any."""
        config, stack_module = self.config, self.family.stack_module
        adapter = get_adapter(config.text_config.model_type)
        ffn = adapter.ffn_spec(config.text_config)
        stack_modules = nn.ModuleDict()
        for stack, layers in adapter.stacks(self.backbone).items():
            extra = ()
            if stack_module is not None:
                stack_modules[stack] = stack_module(config, ffn.hidden_size, len(layers))
                extra = (_StackModule(stack_modules, stack),)
            for idx, layer in enumerate(layers):
                if config.is_moe_layer(idx):
                    moe = self.layer_class(config, ffn, idx, *extra).train(layer.training)
                    adapter.install(layer, MoeFeedForward(moe, stack, adapter.block_dropout(config.text_config)))
        return stack_modules

    def init_parallel_plans(self):
        """transformers' distributed engine plans (docs/backbones.md §5): the dense model's rules (over the same
        modules), less those of the dense FFNs the MoE blocks replaced, plus rules for the fused experts: tensor
        parallel (each rank a slice of every expert's inner dimension) where the backbone has a plan, expert parallel
        (each rank whole experts) on every backbone. Every rule names existing parameters."""
        dense = self.backbone
        dense.init_parallel_plans()  # its class's plans and those of its children, our base model's included
        self._pp_plan, self._fsdp_plan = dict(dense._pp_plan), dict(dense._fsdp_plan)
        tp_plan, ep_plan = dict(dense._tp_plan), dict(dense._ep_plan)
        for rule, experts in _experts_rules(self).items():
            names = [name for name, _ in experts.named_parameters(recurse=False)]
            ep_plan |= {f"{rule}.{name}": "grouped_gemm" for name in names} | {rule: "ep_dispatch_experts"}
            if dense._tp_plan and experts.has_gate and not experts.has_bias:
                tp_plan |= {f"{rule}.gate_up_proj": "packed_colwise", f"{rule}.down_proj": "rowwise",
                            rule: "moe_tp_experts"}
        parameters = [name for name, _ in self.named_parameters()]
        self._tp_plan = {key: style for key, style in tp_plan.items() if _names_parameters(key, parameters)}
        self._ep_plan = {key: style for key, style in ep_plan.items() if _names_parameters(key, parameters)}

    def _statistics_group(self):
        """Under transformers' distributed engine with data parallelism, the process group of the ranks holding
        different batches (the dp_replicate and fsdp axes), over which router statistics are taken; else None."""
        config = getattr(self.config, "distributed_config", None)
        if self._mesh_manager is None or config is None or config.dp_size <= 1:
            return None
        if (config.dp_replicate_size or 1) == 1:
            return self._mesh_manager.get_mesh("fsdp").get_group()
        return self._mesh_manager.get_mesh(("dp_replicate", "fsdp"))._flatten().get_group()

    def _resolve_parallel_plans(self, distributed_config):
        if (distributed_config.tp_size or 1) > 1 and not self.backbone._tp_plan:
            raise ValueError(
                f"Tensor parallelism needs the backbone's plan, and transformers has none for "
                f"{self.config.text_config.model_type}: use tp_size=1 with expert parallelism and FSDP (ep_size, "
                "fsdp_size), or a backbone with a plan (llama, mistral, qwen2, qwen3)."
            )
        return super()._resolve_parallel_plans(distributed_config)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        renamings = model._legacy_key_renamings(_checkpoint_keys(state_dict, checkpoint_files))
        if renamings:
            mapping = [*renamings, *(load_config.weight_mapping or [])]
            load_config = dataclasses.replace(load_config, weight_mapping=mapping)
        result = PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)
        # transformers reverses the renamings a model was loaded with when saving it; ours are not to be reversed
        model._weight_conversions = [c for c in model._weight_conversions if not any(c is r for r in renamings)]
        return result

    def _legacy_key_renamings(self, checkpoint_keys) -> list[WeightRenaming]:
        """Renamings that load a checkpoint of hf-moe 0.1, which kept the dense model (or, for `<Family>Model`,
        a container of the dense base model) under `model.` and HyperMoE's generators at the top (docs/backbones.md
        §6); none for a checkpoint in the current layout, recognised by its keys."""
        prefix = self.base_model_prefix
        if self.auto_class is AutoModel:  # model.<prefix>.<key> -> <key>
            old_container, renamings = {prefix}, [(rf"^model\.{prefix}\.(.+)$", r"\1")]
        else:  # model.<key> -> <key>, and the generators into the base model
            old_container = set(self._modules) - {"hyper_generators"}
            renamings = [(r"^model\.(.+)$", r"\1")]
            if self.base_model is not self:
                renamings.append((r"^hyper_generators\.(.+)$", rf"{prefix}.hyper_generators.\1"))
        if not any(key.startswith(f"model.{name}.") for key in checkpoint_keys for name in old_container):
            return []
        return [WeightRenaming(source_patterns=old, target_patterns=new) for old, new in renamings]

    def path_in_0_1(self, path: str) -> str:
        """The path a module of this model had in hf-moe 0.1's layout (see `_legacy_key_renamings`), the same in a
        base model and its heads: conversions seed each new module by it, so they draw the numbers they drew in 0.1."""
        prefix = self.base_model_prefix
        if self.base_model is not self:  # a head: the new modules are its base model's
            path = path.removeprefix(f"{prefix}.")
        if path.startswith("hyper_generators."):
            return path
        holds_dense_base = self.auto_class is AutoModel or self.base_model is not self
        return f"model.{prefix}.{path}" if holds_dense_base else f"model.{path}"

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts):
        # our eager path (sorted loop over experts) reaches the dense floor on CPU (docs/backbones.md §3)
        return super().get_correct_experts_implementation(requested_experts or "eager")

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        return self.backbone.get_expanded_tied_weights_keys()  # the dense model's ties, as its config says

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.training = mode  # the dense forward reads its own flag
        return self

    def _init_weights(self, module):
        # the dense model's init (a new head or pooler is initialised as transformers would)
        self.backbone._init_weights(module)

    def initialize_weights(self):
        super().initialize_weights()
        # each initialises only its own direct parameters, with transformers' skip-if-loaded init functions
        init_types = self.init_module_types
        for module in self.modules():
            if isinstance(module, init_types):
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

    def _supports_logits_to_keep(self) -> bool:
        # generate() passes `logits_to_keep` when the forward names it; only the causal-LM backbone heads take it
        return self.auto_class is AutoModelForCausalLM

    def get_encoder(self, *args, **kwargs):
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
        logits_to_keep: int | torch.Tensor = 0,
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
        # dynamo cannot trace ContextVar.get; while compiling, a context exists only once a compiled forward set it
        context = None if torch.compiler.is_compiling() and not _ROUTING_CONTEXT.compiling else _ROUTING_CONTEXT.get()
        if context is not None and context.base_model is self:  # our head's dense forward calls its base model
            return self.backbone(**inputs, **kwargs, return_dict=return_dict)
        if self._supports_logits_to_keep():
            inputs["logits_to_keep"] = logits_to_keep
        elif not isinstance(logits_to_keep, int) or logits_to_keep:
            raise ValueError(f"logits_to_keep applies to causal-LM heads only, not to {type(self).__name__}.")
        cache = kwargs.get("cache", past_key_values)
        if self.config.text_config.is_encoder_decoder:
            masks = {
                "encoder": token_padding_mask(attention_mask),
                "decoder": token_padding_mask(decoder_attention_mask, cache),
            }
        else:
            masks = dict.fromkeys(("encoder", "decoder"), token_padding_mask(attention_mask, cache))
        recorded = []
        base_model = self.base_model if self.base_model is not self else None
        token = _ROUTING_CONTEXT.set(RoutingContext(masks, recorded, base_model))
        group_token = STATISTICS_GROUP.set(self._statistics_group())
        try:
            outputs = self.backbone(**inputs, **kwargs, return_dict=True)
        finally:
            STATISTICS_GROUP.reset(group_token)
            _ROUTING_CONTEXT.reset(token)
        layer_outputs = [o for _, o in recorded]
        if (
            torch.is_grad_enabled()
            and any(not o.router_logits.requires_grad for o in layer_outputs)
            and any(p.requires_grad for b in self.moe_blocks() for p in b.moe.router.parameters())
        ):
            raise ValueError(
                "The router losses have no gradient: reentrant gradient checkpointing runs the MoE layers without "
                "grad. Enable it with gradient_checkpointing_kwargs={'use_reentrant': False} (the default)."
            )
        output = MOE_OUTPUT_CLASSES[type(outputs)](**outputs)
        if layer_outputs:
            stacks = [stack for stack, _ in recorded]
            output.aux_loss, z_loss = pooled_router_losses(layer_outputs, stacks, self.config.router_loss_pooling)
            if getattr(output, "loss", None) is not None:
                output.loss = output.loss + self.router_loss(layer_outputs, output.aux_loss, z_loss, labels, **kwargs)
            if output_router_logits if output_router_logits is not None else self.config.output_router_logits:
                output.router_logits = tuple(o.router_logits for o in layer_outputs)
            output.router_stats = tuple(
                dataclasses.replace(o, hidden_states=None, router_logits=None, expert_index=None, token_mask=None)
                for o in layer_outputs
            )
        return output if return_dict is not False else output.to_tuple()

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        # under torch.distributed every rank calls this; the code and card, as the weights, are written by the first
        on_this_rank = self.should_save_on_this_rank(is_main_process)
        model_class = _unwrapped_class(type(self))
        if on_this_rank and model_class is not type(self) and model_class.is_remote_code():
            # FSDP2's subclass of ours saved no code (`is_remote_code`): save ours, then the config naming it
            custom_object_save(object.__new__(model_class), save_directory, config=self.config)
            self.config.save_pretrained(save_directory)
        if on_this_rank and not os.path.exists(os.path.join(save_directory, "README.md")):
            self.write_model_card(save_directory)

    @classmethod
    def is_remote_code(cls) -> bool:
        # FSDP2 swaps a sharded model's class for a subclass of its own (module torch...), whose file transformers
        # would save as the modeling code and name in `auto_map`; `save_pretrained` saves our class's code instead
        return super().is_remote_code() and _unwrapped_class(cls) is cls

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
        top_k, num_experts = config.fixed_experts_per_token, config.num_experts
        if top_k is None:
            active = f"data-dependent; {total - experts * (1 - 1 / num_experts):,.0f} at one expert"
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
        package = "hf_moe"  # named in the card's text only: this file imports nothing of the package
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

| family | backbone | experts | routing | MoE layers | total parameters | active parameters |
|---|---|---|---|---|---|---|
| {config.model_type} | {text_config.model_type} | {num_experts} | {config.routing_summary()} | \
{moe_layers} | {total:,} | {active} |

## How to load

With hf-moe installed (`pip install hf-moe`), importing it registers the family with transformers:

```python
import {package}
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

    def router_loss(
        self, layer_outputs, aux_loss, z_loss, labels=None, num_items_in_batch=None, shift_labels=None, **kwargs
    ):
        """router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss (both pooled over the MoE layers as
        `router_loss_pooling` says) + the (top-p) entropy term summed over MoE layers.

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
            loss = loss + config.router_z_loss_coef * z_loss
        if getattr(config, "router_entropy_loss_coef", 0):
            loss = loss + config.router_entropy_loss_coef * sum(o.entropy_loss for o in layer_outputs)
        if num_items_in_batch is not None and self.accepts_loss_kwargs:
            predicted = shift_labels if shift_labels is not None else labels[..., 1:]
            loss = loss * predicted.ne(-100).sum() / num_items_in_batch
        return loss


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
GENERATIVE_HEADS = ("ForCausalLM", "ForConditionalGeneration")

__all__ = [
    "HEADS",
    "MoeFeedForward",
    "MoePreTrainedModel",
    "RoutingContext",
    "token_padding_mask",
]
