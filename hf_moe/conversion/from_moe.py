"""Conversion of existing MoE checkpoints into hf-moe families, reusing their experts and router weights.

Two entry points, as for upcycling: `convert_moe_model` converts a loaded transformers MoE model in memory;
`convert_moe` loads a checkpoint (local folder or Hub id), converts it and writes an hf-moe checkpoint folder.

Supported sources and targets (only where the target family's math can take over the source's router and experts):

| source | backbone | targets | exact at conversion |
|---|---|---|---|
| Mixtral (`MixtralForCausalLM`, `MixtralModel`, and its other heads) | `mistral` | `topk_moe`, `hypermoe`, `dynamic_moe` | `topk_moe`; `hypermoe` with the HyperExpert zeroed (default); not `dynamic_moe` |
| SwitchTransformers (`...ForConditionalGeneration`, `SwitchTransformersModel`) | `t5` (ReLU) | `topk_moe`, `hypermoe` | both (hypermoe zeroed), dropless, in eval mode |

Why the others are refused: HyperRouter generates every router from a hypernetwork, so a trained router has no place in
it; MH-MoE experts act on d/h-wide sub-tokens behind new projections, so trained experts cannot be reused. Qwen2-MoE's
shared expert, OLMoE's whole-projection q/k norms and DeepSeek's grouped sigmoid routing have no hf-moe counterpart.

**Mixtral** (transformers 5.23 `modeling_mixtral.py`). A `MixtralDecoderLayer` is a `MistralDecoderLayer` (same
`self_attn`, `input_layernorm`, `post_attention_layernorm`, same sliding-window masks and RoPE) whose `mlp` is a
`MixtralSparseMoeBlock`: router `mlp.gate.weight` [E, H], fused experts `mlp.experts.gate_up_proj` [E, 2I, H] (gate
rows first) and `mlp.experts.down_proj` [E, H, I]. Routing is softmax over all experts, top-k, renormalise: hf-moe's
`top_k_routing` with `norm_topk_prob=True`, over `GatedExperts` of the same layout. Differences outside float32 eval:

- Mixtral computes the router logits in the model dtype and the softmax in float32; hf-moe computes both in float32,
  so a bf16/fp16 model can pick a different expert where two probabilities tie to within the logits' rounding.
- Mixtral's training jitter multiplies the block input in place, so router and experts see the noise; hf-moe jitters
  the router input only (methods.md §1).
- `router_aux_loss_coef` is carried over, but Mixtral pools its balance statistic over all layers, whereas hf-moe sums
  the per-layer losses (methods.md §1): the same coefficient weighs the balance about `num_layers` times more.
- `dynamic_moe` replaces top-k by top-p (`router_top_p`, default 0.4): each token keeps the fewest experts whose
  probabilities pass p, so it is not the source model. We default it to `norm_topk_prob=True`, the source's weighting
  (weights summing to 1): a token whose top-p set is its top-k set is then computed exactly as in Mixtral.

**SwitchTransformers** (transformers 5.23 `modeling_switch_transformers.py`). A T5 encoder-decoder whose sparse blocks
(`block.is_sparse`: `i % sparse_step == 1`, every block when the step is 1) hold `layer[-1].mlp` =
`SwitchTransformersSparseMLP`: router `mlp.router.classifier` (Linear d -> E, no bias unless `router_bias`) and
experts `mlp.experts.expert_{e}.wi` [d_ff, d] / `.wo` [d, d_ff] (ReLU `SwitchTransformersDenseActDense`). Dense blocks'
`mlp.wi/wo` are T5's `DenseReluDense.wi/wo`; attention, layer norms, relative position bias and the tied,
`d_model**-0.5`-rescaled LM head are T5's (T5's `scale_decoder_outputs` follows Switch's `tie_word_embeddings`). Routing is top-1 with weight =
p_max (no renormalisation): hf-moe top-k with k = 1 and `norm_topk_prob=False`, over `PlainExperts` whose `up_proj` /
`down_proj` stack the experts' `wi` / `wo`. Differences:

- **Capacity.** Switch drops tokens past `expert_capacity`, an absolute per-expert count taken per sequence in token
  order. hf-moe is dropless by default; its optional `expert_capacity_factor` counts over the whole batch (without
  padding), so it cannot reproduce Switch's drops. The conversion is exact only while no token is dropped by Switch
  (`expert_capacity >= tokens per sequence`); google/switch-base-* use 64, so longer inputs differ.
- **Dropped tokens.** Switch 5.23 gives a dropped token a zero FFN output (residual only); transformers 4.x, and the
  copy HyperMoE's Switch variant vendors, gave `p_max * x` (HyperMoE adds its HyperExpert on top, methods.md §2.2).
  hf-moe's capacity drops also give zero (plus the HyperExpert in `hypermoe`).
- **Jitter.** `router_jitter_noise` (0.01 in Switch) is carried over and applies in training only in both. In float32,
  Switch's in-place jitter also reaches the experts' input (its `.to(float32)` returns the same tensor); hf-moe jitters
  the router input only.
- **Router dtype.** Switch computes the router in `router_dtype` (float32 by default); hf-moe in float32 or wider.
- **Losses.** `router_z_loss_coef` and `router_aux_loss_coef` are carried over; Switch averages z-loss and pools the
  balance statistic over each stack's layers (and computes neither when a stack's sparse step is 1), hf-moe sums
  per-layer losses over both stacks.
- Switch's `router_ignore_padding_tokens` is not read by the 5.23 forward; hf-moe excludes padding from its losses.
- An untied Switch (`tie_word_embeddings=False`, separate `lm_head`) cannot be converted: transformers 5.23's T5 always
  ties `lm_head` to the shared embedding.
"""

import copy
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, MistralConfig, PreTrainedModel, T5Config

from ..modeling import (
    FAMILY_BY_MODEL_TYPE,
    FAMILY_CONFIG_CLASSES,
    HEADS,
    MODEL_CLASSES,
    HyperExpertGenerator,
    MoeFeedForward,
    get_adapter,
)
from .output import (
    carried_files_line,
    carry_source_files,
    refuse_existing,
    refuse_overlap,
    sigterm_as_interrupt,
    source_name,
    staged_output,
    write_conversion_card,
)
from .upcycle import UpcycleOptions, build_moe_config, finish_new_module, head_of

logger = logging.getLogger(__name__)

SUPPORTED_CONVERSIONS = {
    "mixtral": ("topk_moe", "hypermoe", "dynamic_moe"),
    "switch_transformers": ("topk_moe", "hypermoe"),
}

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

_REFUSED_FAMILIES = {
    "hyperrouter": "HyperRouter generates every router from a frozen hypernetwork and a layer embedding, so the "
    "source's trained router weights cannot be reused",
    "mh_moe": "MH-MoE experts act on d/h-wide sub-tokens behind new projections, so the source's trained experts "
    "cannot be reused",
    "dynamic_moe": "dynamic top-p routing is offered for Mixtral sources only",
}

# family options that would change the converted structure, not just its routing
_STRUCTURAL_OPTIONS = (
    "text_config", "num_experts", "moe_layers", "moe_layer_frequency", "moe_intermediate_size", "dtype"
)


def _supported_list() -> str:
    return "; ".join(f"{source} -> {', '.join(families)}" for source, families in SUPPORTED_CONVERSIONS.items())


def check_supported(model_type: str | None, family: str):
    """Raise ValueError, naming the supported conversions and the reason, unless `model_type` -> `family` is one."""
    if family not in FAMILY_CONFIG_CLASSES:
        raise ValueError(
            f"Unknown family {family!r}; hf-moe families are {', '.join(FAMILY_CONFIG_CLASSES)}. "
            f"Supported MoE conversions: {_supported_list()}."
        )
    if model_type not in SUPPORTED_CONVERSIONS:
        reason = _REFUSED_SOURCES.get(model_type, "no converter exists for this architecture")
        raise ValueError(
            f"Cannot convert a {model_type!r} model: {reason}. Supported MoE conversions: {_supported_list()}. "
            "(Dense checkpoints are upcycled with hf_moe.conversion.upcycle.)"
        )
    if family not in SUPPORTED_CONVERSIONS[model_type]:
        reason = _REFUSED_FAMILIES.get(family, "not supported")
        raise ValueError(
            f"Cannot convert {model_type!r} into {family!r}: {reason}. Supported MoE conversions: {_supported_list()}."
        )


# ---------------------------------------------------------------------------------------------------------------
# sources: config translation and weight extraction


def _mixtral_configs(config):
    """MistralConfig of the backbone and the hf-moe fields of a Mixtral config."""
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


def _mixtral_weights(model):
    """Source state without the MoE blocks (keys as in the matching Mistral model), and per (stack, layer) the router
    and experts in hf-moe's layout."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    moe_paths, moe_weights = [], {}
    for idx, layer in enumerate(model.base_model.layers):
        block = layer.mlp
        if not isinstance(block, MixtralSparseMoeBlock):
            raise ValueError(f"Mixtral layer {idx} has no MixtralSparseMoeBlock `mlp` ({type(block).__name__}).")
        moe_paths.append(_module_path(model, block))
        moe_weights["decoder", idx] = {
            "router": block.gate.weight,
            "experts": {"gate_up_proj": block.experts.gate_up_proj, "down_proj": block.experts.down_proj},
        }
    return _state_without(model, moe_paths), moe_weights


def _switch_configs(config):
    """T5Config of the backbone and the hf-moe fields of a SwitchTransformers config (moe_layers come from the
    model's blocks, see `_switch_moe_layers`)."""
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


def _switch_weights(model):
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    if not model.config.tie_word_embeddings:
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and not torch.equal(lm_head.weight, model.shared.weight):
            raise ValueError(
                "This SwitchTransformers model has an untied lm_head (tie_word_embeddings=False); transformers' T5 "
                "always ties lm_head to the shared embedding, so it cannot be converted."
            )
    moe_paths, renames, moe_weights = [], {}, {}
    for stack, blocks in _switch_stacks(model).items():
        for idx, block in enumerate(blocks):
            ff = block.layer[-1]
            ff_path = _module_path(model, ff)
            if isinstance(ff.mlp, SwitchTransformersSparseMLP):
                moe_paths.append(f"{ff_path}.mlp")
                experts = [ff.mlp.experts[f"expert_{e}"] for e in range(ff.mlp.router.num_experts)]
                moe_weights[stack, idx] = {
                    "router": ff.mlp.router.classifier.weight,
                    "experts": {
                        "up_proj": torch.stack([expert.wi.weight for expert in experts]),  # [E, d_ff, d]
                        "down_proj": torch.stack([expert.wo.weight for expert in experts]),  # [E, d, d_ff]
                    },
                }
            else:
                renames[f"{ff_path}.mlp."] = f"{ff_path}.DenseReluDense."
    state = {}
    for key, tensor in _state_without(model, moe_paths).items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        state[renames[prefix] + key[len(prefix) :] if prefix else key] = tensor
    return state, moe_weights


def _state_without(model, module_paths) -> dict:
    prefixes = tuple(f"{path}." for path in module_paths)
    return {key: tensor for key, tensor in model.state_dict().items() if not key.startswith(prefixes)}


def _module_path(root, module) -> str:
    for path, candidate in root.named_modules():
        if candidate is module:
            return path
    raise KeyError(module)


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
    found = HEADS[head]._model_mapping.get(type(config), None)
    if found is None or found.__name__ != architecture:
        heads = [cls.__name__ for auto in HEADS.values() if (cls := auto._model_mapping.get(type(config), None))]
        raise ValueError(
            f"{architecture} has no hf-moe head; convertible {config.model_type} classes: {', '.join(heads)}."
        )
    return head


# ---------------------------------------------------------------------------------------------------------------
# in memory


def conversion_note(source_fields: dict, config, zero_hyper_expert: bool) -> str | None:
    """Why the converted model will not reproduce the source (float32, eval mode, nothing dropped), or None."""
    reasons = []
    source_k, top_k = source_fields["num_experts_per_tok"], config.num_experts_per_tok
    if config.model_type == "dynamic_moe":
        reasons.append(
            f"top-p routing (router_top_p={config.router_top_p}) replaces the source's top-{source_k}, so tokens "
            "whose top-p set differs from their top-k set are computed differently"
        )
    else:
        if top_k != source_k:
            reasons.append(f"num_experts_per_tok changed from {source_k} to {top_k}")
        if config.normalize_topk(top_k) != source_fields["norm_topk_prob"]:
            reasons.append(f"norm_topk_prob differs from the source's ({source_fields['norm_topk_prob']})")
    if config.model_type == "hypermoe" and not zero_hyper_expert:
        reasons.append("the HyperExpert starts at its tiny official init, not at 0 (zero_hyper_expert=True removes it)")
    if config.expert_capacity_factor is not None:
        reasons.append("hf-moe's capacity rule (expert_capacity_factor) drops different tokens than the source's")
    return "; ".join(reasons) or None


def convert_moe_model(source_model: PreTrainedModel, family: str, *, zero_hyper_expert: bool = True, **family_options):
    """A loaded transformers MoE model (Mixtral, SwitchTransformers) -> the same model as an hf-moe `family` model
    (a model type: "topk_moe", "hypermoe", "dynamic_moe"), with the source's router and expert weights.

    `zero_hyper_expert` zeroes HyperMoE's generator heads, so its HyperExpert adds exactly 0 until trained.
    `family_options` set routing fields of the family config (e.g. `router_top_p`, `num_experts_per_tok`,
    `expert_capacity_factor`); fields that fix the structure (`num_experts`, `moe_layers`, ...) come from the source.
    Raises ValueError for unsupported sources or families; logs a warning when the result is not the source's function
    (see `conversion_note` and the module docstring).
    """
    return _convert(source_model, family, zero_hyper_expert, family_options)[0]


@torch.no_grad()
def _convert(source_model, family, zero_hyper_expert, family_options):
    """`convert_moe_model`, also returning the `conversion_note`."""
    source_config = source_model.config
    model_type = getattr(source_config, "model_type", None)
    check_supported(model_type, family)
    fixed = sorted(set(family_options) & set(_STRUCTURAL_OPTIONS))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} come(s) from the source model and cannot be set when converting it.")
    make_configs, read_weights = _SOURCES[model_type]
    text_config, source_fields = make_configs(source_config)
    if model_type == "switch_transformers":
        source_fields.update(_switch_moe_layers(source_model))
    fields = dict(source_fields)
    if family == "dynamic_moe":
        fields["norm_topk_prob"] = True  # the source's weights sum to 1 (module docstring)
    fields.update(family_options)
    structure = (fields.pop("num_experts"), fields.pop("num_experts_per_tok"), fields.pop("moe_layers"))
    config = build_moe_config(text_config, family, *structure, **fields)

    head = _source_head(source_config, type(source_model).__name__)
    model_class = MODEL_CLASSES[FAMILY_BY_MODEL_TYPE[family], head]
    with torch.random.fork_rng(devices=[]):  # new HyperMoE parameters: deterministic, global RNG untouched
        torch.manual_seed(0)
        moe = model_class(config)
    moe.to(source_model.dtype)

    backbone_state, moe_weights = read_weights(source_model)
    result = moe.backbone.load_state_dict(backbone_state, strict=False)
    block_paths = tuple(f"{_module_path(moe.backbone, b)}." for b in moe.moe_blocks())
    missing = [key for key in result.missing_keys if not key.startswith(block_paths)]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{type(source_model).__name__} does not map onto {type(moe.backbone).__name__}: unexpected "
            f"{sorted(result.unexpected_keys)[:5]}, missing {sorted(missing)[:5]}."
        )
    for stack, layers in get_adapter(text_config.model_type).stacks(moe.backbone).items():
        for idx, layer in enumerate(layers):
            block = next((m for m in layer.modules() if isinstance(m, MoeFeedForward)), None)
            weights = moe_weights.pop((stack, idx), None)
            if (block is None) != (weights is None):
                raise ValueError(f"MoE layer placement differs from the source at {stack} layer {idx}.")
            if block is None:
                continue
            _copy(block.moe.router.weight, weights["router"], f"{stack}.{idx} router")
            experts = dict(block.moe.experts.named_parameters())
            if set(experts) != set(weights["experts"]):
                raise ValueError(f"{stack}.{idx}: experts {sorted(weights['experts'])} do not match {sorted(experts)}.")
            for name, param in experts.items():
                _copy(param, weights["experts"][name], f"{stack}.{idx} experts.{name}")
    if moe_weights:
        raise ValueError(f"Source MoE layers without a place in the converted model: {sorted(moe_weights)}.")

    options = UpcycleOptions(zero_hyper_expert=zero_hyper_expert)
    for module in moe.modules():
        if isinstance(module, HyperExpertGenerator):
            finish_new_module(module, options)
    if source_model.can_generate() and moe.can_generate():
        moe.generation_config = copy.deepcopy(source_model.generation_config)
    note = conversion_note(source_fields, config, zero_hyper_expert)
    if note:
        logger.warning("The converted %s model is not the source's function: %s.", family, note)
    return moe.train(source_model.training), note


def _copy(param, tensor, what):
    if param.shape != tensor.shape:
        raise ValueError(f"{what}: source shape {tuple(tensor.shape)} != hf-moe shape {tuple(param.shape)}.")
    param.copy_(tensor)


# ---------------------------------------------------------------------------------------------------------------
# checkpoint folders


@sigterm_as_interrupt()
def convert_moe(
    source: str,
    output_dir: str,
    family: str,
    *,
    overwrite: bool = False,
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    zero_hyper_expert: bool = True,
    **family_options,
) -> Path:
    """Convert an MoE checkpoint (local folder or Hub id) into an hf-moe `family` checkpoint folder at `output_dir`
    that loads with `from_pretrained` (after `import hf_moe`, or with `trust_remote_code=True`). Returns the path.

    The source is loaded with the transformers auto class of its architecture, in `dtype` ("auto": the checkpoint's;
    torch.float32 to convert on CPU in full precision), converted with `convert_moe_model` and saved to a temporary
    folder next to the target, with every non-weight file of the source, then renamed into place. An existing target
    is refused unless `overwrite`, and so is a target that is, contains or lies inside the source. Ctrl-C or SIGTERM
    raise KeyboardInterrupt once the partial output is removed; a full disk or a read-only target raise an OSError
    naming the target.
    """
    from .sources import resolve_source

    target = Path(output_dir).expanduser().resolve()
    refuse_existing(target, overwrite)
    folder = resolve_source(str(source), revision=revision)
    refuse_overlap(folder, target)
    source_config = AutoConfig.from_pretrained(folder)
    check_supported(getattr(source_config, "model_type", None), family)  # before loading any weight
    head = _source_head(source_config, None)
    source_model = HEADS[head].from_pretrained(folder, dtype=dtype).eval()
    moe, note = _convert(source_model, family, zero_hyper_expert, family_options)
    del source_model

    with staged_output(target) as staging:
        carried = carry_source_files(folder, staging)
        moe.save_pretrained(staging)
        section = _card_section(source_name(source), source_config, family, family_options, note, carried)
        write_conversion_card(moe, staging, source, folder, section)
    return target


def _card_section(source, source_config, family, family_options, note, carried) -> str:
    architecture = (source_config.architectures or [source_config.model_type])[0]
    options = [f"- `{name}`: {value}" for name, value in family_options.items()] or ["- none"]
    lines = [
        "## Conversion",
        "",
        f"Converted by `hf_moe.conversion.convert_moe` from the `{architecture}` checkpoint `{source}` into "
        f"`{family}`, reusing its router and expert weights. Family options:",
        "",
        *options,
        "",
        f"Same function as the source (float32, eval, no capacity drops): {'no — ' + note if note else 'yes'}.",
        "",
        carried_files_line(carried),
    ]
    return "\n".join(lines) + "\n"


__all__ = ["SUPPORTED_CONVERSIONS", "check_supported", "conversion_note", "convert_moe", "convert_moe_model"]
