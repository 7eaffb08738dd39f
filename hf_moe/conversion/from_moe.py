"""Conversion of existing MoE checkpoints into hf-moe families, reusing their experts and router weights.

Two entry points, as for upcycling (docs/upcycling.md §5): `convert_moe_model` converts a loaded transformers MoE model
in memory; `convert_moe` streams a checkpoint (local folder or Hub id) tensor by tensor into an hf-moe checkpoint
folder, the source model never loaded (docs/upcycling.md §4).

Supported sources and targets (only where the target family's math can take over the source's router and experts):

| source | backbone | targets |
|---|---|---|
| Mixtral (`MixtralForCausalLM`, `MixtralModel`, its other heads) | `mistral` | `topk_moe`, `hypermoe`, `dynamic_moe` |
| SwitchTransformers (`...ForConditionalGeneration`, `SwitchTransformersModel`) | `t5` (ReLU) | `topk_moe`, `hypermoe` |

Exact at conversion: from Mixtral, `topk_moe`, and `hypermoe` with the HyperExpert zeroed (default), not `dynamic_moe`;
from SwitchTransformers, both (hypermoe zeroed), dropless, in eval mode.

Why the others are refused: HyperRouter generates every router from a hypernetwork, so a trained router has no place in
it; MH-MoE experts act on d/h-wide sub-tokens behind new projections, so trained experts cannot be reused. Qwen2-MoE's
shared expert, OLMoE's whole-projection q/k norms and DeepSeek's grouped sigmoid routing have no hf-moe counterpart.

**Mixtral** (transformers 5.23 `modeling_mixtral.py`). A `MixtralDecoderLayer` is a `MistralDecoderLayer` (same
`self_attn`, `input_layernorm`, `post_attention_layernorm`, same sliding-window masks and RoPE) whose `mlp` is a
`MixtralSparseMoeBlock`: router `mlp.gate.weight` [E, H], fused experts `mlp.experts.gate_up_proj` [E, 2I, H] (gate
rows first) and `mlp.experts.down_proj` [E, H, I]. Routing is softmax over all experts, top-k, renormalise: hf-moe's
`top_k_routing` with `norm_topk_prob=True`, over `GatedExperts` of the same layout. Differences outside float32 eval,
each with the family option that reproduces Mixtral (docs/topk.md §6), passed as a family option of the conversion:

- Mixtral computes the router logits in the model dtype and the softmax in float32; hf-moe computes both in float32,
  so a bf16/fp16 model can pick a different expert where two probabilities tie to within the logits' rounding
  (`router_dtype="model"`).
- Mixtral's training jitter multiplies the block input in place, so router and experts see the noise; hf-moe jitters
  the router input only (`router_jitter_scope="input"`).
- `router_aux_loss_coef` is carried over, but Mixtral pools its balance statistic over all layers, whereas hf-moe sums
  the per-layer losses: the same coefficient weighs the balance about `num_layers` times more
  (`router_loss_pooling="mixtral"`).
- `dynamic_moe` replaces top-k by top-p (`router_top_p`, default 0.4): each token keeps the fewest experts whose
  probabilities pass p, so it is not the source model. We default it to `norm_topk_prob=True`, the source's weighting
  (weights summing to 1): a token whose top-p set is its top-k set is then computed exactly as in Mixtral.

**SwitchTransformers** (transformers 5.23 `modeling_switch_transformers.py`). A T5 encoder-decoder whose sparse blocks
(`block.is_sparse`: `i % sparse_step == 1`, every block when the step is 1) hold `layer[-1].mlp` =
`SwitchTransformersSparseMLP`: router `mlp.router.classifier` (Linear d -> E, no bias unless `router_bias`) and
experts `mlp.experts.expert_{e}.wi` [d_ff, d] / `.wo` [d, d_ff] (ReLU `SwitchTransformersDenseActDense`). Dense blocks'
`mlp.wi/wo` are T5's `DenseReluDense.wi/wo`; attention, layer norms, relative position bias and the tied,
`d_model**-0.5`-rescaled LM head are T5's (T5's `scale_decoder_outputs` follows Switch's `tie_word_embeddings`).
Routing is top-1 with weight = p_max (no renormalisation): hf-moe top-k with k = 1 and `norm_topk_prob=False`, over
`PlainExperts` whose `up_proj` / `down_proj` stack the experts' `wi` / `wo`. Differences:

- **Capacity.** Switch drops tokens past `expert_capacity`, an absolute per-expert count taken per sequence in token
  order. hf-moe is dropless by default, so the conversion is exact only while Switch drops no token
  (`expert_capacity >= tokens per sequence`; google/switch-base-* use 64). `expert_capacity_rule="switch"` with the
  source's `expert_capacity` reproduces Switch's drops.
- **Dropped tokens.** Switch 5.23 gives a dropped token a zero FFN output (residual only), as hf-moe does;
  transformers 4.x, and the copy HyperMoE's Switch variant vendors, gave `p_max * x` (`dropped_token_output=
  "scaled_input"`; HyperMoE adds its HyperExpert on top, docs/hypermoe.md §6).
- **Jitter.** `router_jitter_noise` (0.01 in Switch) is carried over and applies in training only in both. In float32,
  Switch's in-place jitter also reaches the experts' input (its `.to(float32)` returns the same tensor); hf-moe jitters
  the router input only (`router_jitter_scope="input"` reproduces Switch).
- **Router dtype.** Switch computes the router in `router_dtype` (float32 by default), as hf-moe does.
- **Losses.** `router_z_loss_coef` and `router_aux_loss_coef` are carried over; Switch averages z-loss and pools the
  balance statistic over each stack's layers (and computes neither when a stack's sparse step is 1), hf-moe sums
  per-layer losses over both stacks (`router_loss_pooling="switch"` reproduces Switch's pooling).
- Switch's `router_ignore_padding_tokens` is not read by the 5.23 forward; hf-moe excludes padding from its losses.
- An untied Switch (`tie_word_embeddings=False`, separate `lm_head`) cannot be converted: transformers 5.23's T5 always
  ties `lm_head` to the shared embedding.
"""

import copy
import functools
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, MistralConfig, PreTrainedModel, T5Config

from ..modeling import HEADS, MODEL_CLASSES, all_families, check_family, get_adapter, get_family
from .output import Converted, source_name, write_conversion
from .safetensors_io import SafetensorsSource
from .streaming import ModelCheckpoint, StreamingPlan, checkpoint_dtype
from .structure import (
    build_moe_config,
    head_of,
    initialise_new_modules,
    module_path,
    why_not_exact,
)

logger = logging.getLogger(__name__)

_REFUSED_SOURCES = {
    "qwen2_moe": "its shared expert (gated by sigmoid(shared_expert_gate(x)), added to every token) has no place in "
    "any hf-moe family",
    "qwen3_moe": "no converter is implemented for it yet",
    "olmoe": "its attention normalises q and k over the whole projection (q_norm/k_norm), which none of hf-moe's "
    "backbones implements",
    "deepseek_v2": "its sigmoid, group-limited routing with shared experts and its MLA attention have no hf-moe "
    "counterpart",
    "deepseek_v3": "its sigmoid, group-limited routing with shared experts and its MLA attention have no hf-moe "
    "counterpart",
}

# family options that would change the converted structure, not just its routing
_STRUCTURAL_OPTIONS = (
    "text_config", "num_experts", "moe_layers", "moe_layer_frequency", "moe_intermediate_size", "dtype"
)


def supported_conversions() -> dict[str, tuple[str, ...]]:
    """Source model type -> the families it converts into (each family's `moe_sources` in the registry)."""
    conversions = {}
    for family in all_families().values():
        for source in family.moe_sources:
            conversions.setdefault(source, ())
            conversions[source] += (family.model_type,)
    return conversions


def _supported_list() -> str:
    return "; ".join(f"{source} -> {', '.join(families)}" for source, families in supported_conversions().items())


def check_supported(model_type: str | None, family: str):
    """Raise ValueError, naming the supported conversions and the reason, unless `model_type` -> `family` is one."""
    try:
        check_family(family)
    except ValueError as error:
        raise ValueError(f"{error} Supported MoE conversions: {_supported_list()}.") from None
    if model_type not in supported_conversions():
        reason = _REFUSED_SOURCES.get(model_type, "no converter exists for this architecture")
        raise ValueError(
            f"Cannot convert a {model_type!r} model: {reason}. Supported MoE conversions: {_supported_list()}. "
            "(Dense checkpoints are upcycled with hf_moe.conversion.upcycle.)"
        )
    if family not in supported_conversions()[model_type]:
        reason = get_family(family).moe_source_refusal
        raise ValueError(
            f"Cannot convert {model_type!r} into {family!r}: {reason}. Supported MoE conversions: {_supported_list()}."
        )


# ---------------------------------------------------------------------------------------------------------------
# sources: config translation and weight extraction


def _mixtral_configs(config, model):
    """MistralConfig of the backbone and the hf-moe fields of a Mixtral config (`model`: the source, on `meta`)."""
    text_config = MistralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,  # Mixtral's expert width
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,  # None: hidden_size // num_attention_heads in both
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=copy.deepcopy(config.rope_parameters),
        sliding_window=config.sliding_window,  # Mistral's default is 4096, Mixtral's None: always pass it
        attention_dropout=config.attention_dropout,
        dtype=config.dtype,
    )
    moe_fields = {
        "num_experts": config.num_local_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "moe_layers": None,  # every layer
        "norm_topk_prob": True,  # softmax -> top-k -> renormalise (MixtralTopKRouter)
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "router_jitter_noise": config.router_jitter_noise,
        "output_router_logits": config.output_router_logits,
        "initializer_range": config.initializer_range,
    }
    return text_config, moe_fields


def _mixtral_weights(model, read):
    """Where the converted model's tensors lie in the source's state dict: the backbone's keys (those of the matching
    Mistral model, unchanged) and per (stack, layer) the router's key and the experts' keys, in hf-moe's layout."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    moe_paths, moe_keys = [], {}
    for idx, layer in enumerate(model.base_model.layers):
        block = layer.mlp
        if not isinstance(block, MixtralSparseMoeBlock):
            raise TypeError(f"Mixtral layer {idx} has no MixtralSparseMoeBlock `mlp` ({type(block).__name__}).")
        path = module_path(model, block)
        moe_paths.append(path)
        moe_keys["decoder", idx] = {
            "router": [f"{path}.gate.weight"],
            "experts": {name: [f"{path}.experts.{name}"] for name in ("gate_up_proj", "down_proj")},
        }
    return {key: key for key in _keys_without(model, moe_paths)}, moe_keys


def _switch_configs(config, model):
    """T5Config of the backbone and the hf-moe fields of a SwitchTransformers config (`model`: the source, on `meta`;
    its sparse blocks give `moe_layers`, see `_switch_moe_layers`)."""
    if config.router_bias:
        raise ValueError("SwitchTransformers with router_bias=True is not supported: hf-moe routers have no bias.")
    if "-" in config.dense_act_fn:
        raise ValueError(f"SwitchTransformers dense_act_fn={config.dense_act_fn!r} has no T5 feed_forward_proj.")
    extra = {}
    if getattr(config, "decoder_start_token_id", None) is not None:
        extra["decoder_start_token_id"] = config.decoder_start_token_id
    text_config = T5Config(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=config.dropout_rate,
        layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_factor=config.initializer_factor,
        feed_forward_proj=config.dense_act_fn,  # "relu": DenseReluDense wi -> relu -> dropout -> wo
        is_encoder_decoder=config.is_encoder_decoder,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,  # T5: decides the d_model**-0.5 output rescaling, as in Switch
        dtype=config.dtype,
        **extra,
    )
    moe_fields = {
        "num_experts": config.num_experts,
        "num_experts_per_tok": 1,
        "norm_topk_prob": False,  # weight = p_max
        "moe_intermediate_size": config.d_ff,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "router_z_loss_coef": config.router_z_loss_coef,
        "router_jitter_noise": config.router_jitter_noise,
        "expert_capacity_factor": None,  # dropless; see the module docstring
        **_switch_moe_layers(model),
    }
    return text_config, moe_fields


def _switch_stacks(model):
    stacks = {"encoder": list(model.encoder.block)}
    if getattr(model, "decoder", None) is not None:
        stacks["decoder"] = list(model.decoder.block)
    return stacks


def _switch_moe_layers(model) -> dict:
    """hf-moe's `moe_layers` / `moe_layer_frequency` for the model's sparse blocks (one setting covers both stacks)."""
    stacks = _switch_stacks(model)
    sparse = {stack: [i for i, block in enumerate(blocks) if block.is_sparse] for stack, blocks in stacks.items()}
    sizes = {stack: len(blocks) for stack, blocks in stacks.items()}
    if not any(sparse.values()):
        raise ValueError("This SwitchTransformers model has no sparse block; upcycle it as a dense T5 instead.")
    layer_sets = {tuple(indices) for indices in sparse.values()}
    if len(layer_sets) == 1 and all(indices for indices in sparse.values()):
        return {"moe_layers": list(sparse["encoder"])}
    for frequency in range(1, max(sizes.values()) + 1):  # stacks of different depths: a frequency may still fit
        placed = {s: [i for i in range(size) if i % frequency == frequency - 1] for s, size in sizes.items()}
        if placed == sparse:
            return {"moe_layers": None, "moe_layer_frequency": frequency}
    raise ValueError(
        f"The sparse blocks of this SwitchTransformers model differ between stacks ({sparse}); hf-moe applies one "
        "moe_layers setting to both stacks."
    )


def _switch_weights(model, read):
    """As `_mixtral_weights`; the experts of a sparse block are stacked from its `expert_{e}` modules, and the dense
    blocks' `mlp` is T5's `DenseReluDense`."""
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    untied = not model.config.tie_word_embeddings and "lm_head.weight" in read
    if untied and not torch.equal(read.get("lm_head.weight"), read.get("shared.weight")):
        raise ValueError(
            "This SwitchTransformers model has an untied lm_head (tie_word_embeddings=False); transformers' T5 "
            "always ties lm_head to the shared embedding, so it cannot be converted."
        )
    moe_paths, renames, moe_keys = [], {}, {}
    for stack, blocks in _switch_stacks(model).items():
        for idx, block in enumerate(blocks):
            ff = block.layer[-1]
            path = f"{module_path(model, ff)}.mlp"
            if isinstance(ff.mlp, SwitchTransformersSparseMLP):
                moe_paths.append(path)
                experts = range(ff.mlp.router.num_experts)
                moe_keys[stack, idx] = {
                    "router": [f"{path}.router.classifier.weight"],
                    "experts": {  # [E, d_ff, d] and [E, d, d_ff], one expert at a time
                        "up_proj": [f"{path}.experts.expert_{e}.wi.weight" for e in experts],
                        "down_proj": [f"{path}.experts.expert_{e}.wo.weight" for e in experts],
                    },
                }
            else:
                renames[f"{path}."] = f"{module_path(model, ff)}.DenseReluDense."
    backbone_keys = {}
    for key in _keys_without(model, moe_paths):
        prefix = next((p for p in renames if key.startswith(p)), None)
        backbone_keys[renames[prefix] + key[len(prefix) :] if prefix else key] = key
    return backbone_keys, moe_keys


def _keys_without(model, module_paths) -> list[str]:
    prefixes = tuple(f"{path}." for path in module_paths)
    return [key for key in model.state_dict() if not key.startswith(prefixes)]


_SOURCES = {
    "mixtral": (_mixtral_configs, _mixtral_weights),
    "switch_transformers": (_switch_configs, _switch_weights),
}
_DEFAULT_HEADS = {"mixtral": "ForCausalLM", "switch_transformers": "ForConditionalGeneration"}


def _source_head(config, architecture: str | None) -> str:
    """The hf-moe head whose transformers class for `config` is `architecture` (default: the checkpoint's)."""
    architecture = architecture or (config.architectures or [None])[0]
    if architecture is None:
        return _DEFAULT_HEADS[config.model_type]
    head = head_of(config, architecture)
    if head is None:
        heads = [cls.__name__ for auto in HEADS.values() if (cls := auto._model_mapping.get(type(config), None))]
        raise ValueError(
            f"{architecture} has no hf-moe head; convertible {config.model_type} classes: {', '.join(heads)}."
        )
    return head


# ---------------------------------------------------------------------------------------------------------------
# the mapping, shared by the in-memory and the streaming conversion


def _moe_config(source_model, family: str, family_options: dict):
    """The family config of the converted model, and the source's own MoE fields."""
    source_config = source_model.config
    check_supported(getattr(source_config, "model_type", None), family)
    fixed = sorted(set(family_options) & set(_STRUCTURAL_OPTIONS))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} come(s) from the source model and cannot be set when converting it.")
    text_config, source_fields = _SOURCES[source_config.model_type][0](source_config, source_model)
    fields = dict(source_fields)  # the source's weighting too: top-p keeps Mixtral's renormalisation (module docstring)
    fields.update(family_options)
    structure = (fields.pop("num_experts"), fields.pop("num_experts_per_tok"), fields.pop("moe_layers"))
    return build_moe_config(text_config, family, *structure, **fields), source_fields


def _origins(source_model, moe, read) -> dict:
    """Output name -> function yielding its tensor (or its experts one at a time) from `read`, a reader of the source
    model's state dict (`keys()`, `get(key)`): the loaded model's own, or a checkpoint read tensor by tensor."""
    backbone_keys, moe_keys = _SOURCES[source_model.config.model_type][1](source_model, read)
    outputs = set(moe.state_dict())
    tied = set(moe.get_expanded_tied_weights_keys(all_submodels=True))
    added = [*moe.moe_blocks(), *moe.base_model.hyper_generators.values()]  # what the source cannot fill
    added_paths = tuple(f"{module_path(moe, module)}." for module in added)
    available = set(read.keys())
    origins = {key: [source] for key, source in backbone_keys.items() if source in available}
    unexpected = sorted(set(origins) - outputs)
    missing = sorted(n for n in outputs - set(origins) - tied if not n.startswith(added_paths))
    if unexpected or missing:
        raise ValueError(
            f"{type(source_model).__name__} does not map onto {type(moe.backbone).__name__}: unexpected "
            f"{unexpected[:5]}, missing {missing[:5]}."
        )
    for stack, layers in get_adapter(moe.config.text_config.model_type).stacks(moe.backbone).items():
        for idx, layer in enumerate(layers):
            block = next((m for m in layer.modules() if m in moe.moe_blocks()), None)
            keys = moe_keys.pop((stack, idx), None)
            if (block is None) != (keys is None):
                raise ValueError(f"MoE layer placement differs from the source at {stack} layer {idx}.")
            if block is None:
                continue
            origins[f"{module_path(moe, block.moe.router)}.weight"] = keys["router"]
            experts = module_path(moe, block.moe.experts)
            names = {name for name, _ in block.moe.experts.named_parameters()}
            if names != set(keys["experts"]):
                raise ValueError(f"{stack}.{idx}: experts {sorted(keys['experts'])} do not match {sorted(names)}.")
            origins.update({f"{experts}.{name}": source_keys for name, source_keys in keys["experts"].items()})
    if moe_keys:
        raise ValueError(f"Source MoE layers without a place in the converted model: {sorted(moe_keys)}.")
    return {name: functools.partial(_read_all, read, keys) for name, keys in origins.items()}


def _read_all(read, keys):
    for key in keys:
        yield read.get(key)


def _finish(family, zero: bool):
    def finish(module):
        if zero and family.zero_added_output is not None:
            family.zero_added_output(module)

    return finish


def conversion_note(source_fields: dict, config, zero_hyper_expert: bool) -> str | None:
    """Why the converted model will not reproduce the source (float32, eval mode, nothing dropped), or None."""
    source_k, top_k = source_fields["num_experts_per_tok"], config.num_experts_per_tok
    changes = []
    if config.fixed_experts_per_token is None:
        changes.append(
            f"{config.routing_summary()} routing replaces the source's top-{source_k}, so tokens whose selected set "
            "differs from their top-k set are computed differently"
        )
    elif top_k != source_k:
        changes.append(f"num_experts_per_tok changed from {source_k} to {top_k}")
    if config.normalize_topk(top_k) != source_fields["norm_topk_prob"]:
        changes.append(f"norm_topk_prob differs from the source's ({source_fields['norm_topk_prob']})")
    return why_not_exact(config, zero_hyper_expert, changes)


# ---------------------------------------------------------------------------------------------------------------
# in memory


@torch.no_grad()
def convert_moe_model(source_model: PreTrainedModel, family: str, *, zero_hyper_expert: bool = True, **family_options):
    """A loaded transformers MoE model (Mixtral, SwitchTransformers) -> the same model as an hf-moe `family` model
    (a model type: "topk_moe", "hypermoe", "dynamic_moe"), with the source's router and expert weights, and the
    tensors `convert_moe` writes.

    `zero_hyper_expert` zeroes HyperMoE's up-projection generator heads, so its HyperExpert adds exactly 0 until
    trained. `family_options` set routing fields of the family config (e.g. `router_top_p`, `num_experts_per_tok`,
    `expert_capacity_factor`); fields that fix the structure (`num_experts`, `moe_layers`, ...) come from the source.
    Raises ValueError for unsupported sources or families; logs a warning when the result is not the source's function
    (see `conversion_note` and the module docstring).
    """
    config, source_fields = _moe_config(source_model, family, family_options)
    head = _source_head(source_model.config, type(source_model).__name__)
    with torch.random.fork_rng(devices=[]):  # new HyperMoE parameters: deterministic, global RNG untouched
        moe = MODEL_CLASSES[get_family(family).class_prefix, head](config).to(source_model.dtype)
        initialise_new_modules(moe, 0, _finish(moe.family, zero_hyper_expert))
    state = moe.state_dict()
    for name, origin in _origins(source_model, moe, source_model.state_dict()).items():
        chunks = list(origin())
        tensor = chunks[0] if len(chunks) == 1 and chunks[0].shape == state[name].shape else torch.stack(chunks)
        if tensor.shape != state[name].shape:
            raise ValueError(f"{name}: source shape {tuple(tensor.shape)} != hf-moe shape {tuple(state[name].shape)}.")
        state[name].copy_(tensor)
    if source_model.can_generate() and moe.can_generate():
        moe.generation_config = copy.deepcopy(source_model.generation_config)
    if note := conversion_note(source_fields, config, zero_hyper_expert):
        logger.warning("The converted %s model is not the source's function: %s.", family, note)
    return moe.train(source_model.training)


# ---------------------------------------------------------------------------------------------------------------
# checkpoint folders


def convert_moe(
    source: str,
    output_dir: str,
    family: str,
    *,
    overwrite: bool = False,
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    zero_hyper_expert: bool = True,
    verify: bool = False,
    max_shard_size: int = 2 * 1024**3,
    progress=True,
    **family_options,
) -> Path:
    """Convert an MoE checkpoint (local folder or Hub id) into an hf-moe `family` checkpoint folder at `output_dir`
    that loads with `from_pretrained` (after `import hf_moe`, or with `trust_remote_code=True`). Returns the path.

    The source is streamed tensor by tensor (never loaded whole) in `dtype` ("auto": the checkpoint's), mapped as
    `convert_moe_model` maps a loaded model, and written with the safety rules of `hf_moe.conversion.upcycle`: a
    staging folder next to the target renamed into place when complete, every non-weight file of the source carried
    over, an existing target refused unless `overwrite`, a target overlapping the source refused, nothing left after
    Ctrl-C, SIGTERM, a full disk or a read-only target. `verify`, `max_shard_size` and `progress` as in `upcycle`.
    """

    def convert(folder, staging):
        source_config = AutoConfig.from_pretrained(folder)
        check_supported(getattr(source_config, "model_type", None), family)  # before reading any weight
        head = _source_head(source_config, None)
        with torch.device("meta"):
            source_model = HEADS[head].from_config(source_config)
        config, source_fields = _moe_config(source_model, family, family_options)
        checkpoint = ModelCheckpoint(SafetensorsSource(folder), source_model)
        if dtype == "auto":
            config.dtype = checkpoint_dtype(checkpoint.source, source_config.dtype)
        else:
            config.dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        config.text_config.dtype = config.dtype
        with torch.device("meta"):
            moe = MODEL_CLASSES[get_family(family).class_prefix, head](config)
        plan = StreamingPlan(
            moe, _origins(source_model, moe, checkpoint), config.dtype, 0, _finish(moe.family, zero_hyper_expert)
        )
        plan.save(staging, max_shard_size, progress)
        note = conversion_note(source_fields, config, zero_hyper_expert)
        if note:
            logger.warning("The converted %s model is not the source's function: %s.", family, note)
        architecture = (source_config.architectures or [source_config.model_type])[0]
        return Converted(
            model=moe,
            summary=f"Converted by `hf_moe.conversion.convert_moe` from the `{architecture}` checkpoint "
            f"`{source_name(source)}` into `{family}`, reusing its router and expert weights. Family options:",
            settings=family_options,
            exactness="Same function as the source (float32, eval, no capacity drops): "
            f"{'no — ' + note if note else 'yes'}.",
        )

    return write_conversion(source, output_dir, convert, overwrite=overwrite, verify=verify, revision=revision)


__all__ = ["check_supported", "conversion_note", "convert_moe", "convert_moe_model"]
