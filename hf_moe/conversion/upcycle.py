"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): a dense checkpoint becomes an MoE of any family with
every expert a copy of the dense FFN, optionally perturbed (noise) or partly re-initialised (Drop-Upcycling, Nakamura
et al., ICLR 2025, arXiv 2502.19261).

Two entry points: `upcycle_model` converts a loaded dense model in memory; `upcycle` streams a safetensors checkpoint
(local folder or Hub id) into a checkpoint folder, tensor by tensor, so peak memory stays near one FFN matrix whatever
the model size. Both build the same expert tensors from the same seed.
"""

import copy
import json
import logging
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save

from ..modeling import (
    CUSTOM_INIT_MODULES,
    FAMILY_BY_MODEL_TYPE,
    FAMILY_CONFIG_CLASSES,
    HEADS,
    MODEL_CLASSES,
    HyperExpertGenerator,
    MoeFeedForward,
    Router,
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
from .safetensors_io import SafetensorsSource, write_sharded

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpcycleOptions:
    """How experts and routers start. Defaults keep the dense function wherever the family allows it."""

    expert_noise_std: float = 0.0  # Gaussian noise on each expert copy, relative to each weight matrix's std
    reinit_fraction: float = 0.0  # Drop-Upcycling: fraction of each expert's FFN neurons re-initialised
    router_init: str = "normal"  # "normal" (std below) or "zeros"
    router_init_std: float | None = None  # None: the config's initializer_range
    zero_hyper_expert: bool = False  # HyperMoE: zero the generator heads, so the HyperExpert starts at exactly 0
    seed: int = 0

    def __post_init__(self):
        if self.router_init not in ("normal", "zeros"):
            raise ValueError(f"router_init={self.router_init!r} must be 'normal' or 'zeros'.")
        if self.expert_noise_std < 0:
            raise ValueError(f"expert_noise_std={self.expert_noise_std} must be >= 0.")
        if not 0 <= self.reinit_fraction <= 1:
            raise ValueError(f"reinit_fraction={self.reinit_fraction} must be in [0, 1].")


def build_moe_config(dense_config, family: str, num_experts: int, num_experts_per_tok: int, moe_layers, **options):
    """The family config over `dense_config`, renormalised top-k by default so that upcycling preserves the function."""
    if family not in FAMILY_CONFIG_CLASSES:
        raise ValueError(f"Unknown family {family!r}; choose one of {', '.join(FAMILY_CONFIG_CLASSES)}.")
    if family != "dynamic_moe":
        options.setdefault("norm_topk_prob", True)
    text_config = copy.deepcopy(dense_config)
    if hasattr(text_config, "quantization_config"):
        del text_config.quantization_config  # the MoE is built unquantised (GGUF sources arrive dequantised)
    return FAMILY_CONFIG_CLASSES[family](
        text_config=text_config,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_layers=moe_layers,
        dtype=dense_config.dtype,
        # task fields live on the wrapper config (it hands them to the backbone): keep the dense head's labels
        id2label=dense_config.id2label,
        label2id=dense_config.label2id,
        problem_type=dense_config.problem_type,
        **options,
    )


def function_preservation_note(config, options: UpcycleOptions) -> str | None:
    """Why this conversion will not reproduce the dense model exactly at step 0, or None if it will."""
    reasons = []
    if config.model_type == "mh_moe":
        reasons.append("MH-MoE experts act on d/h-wide sub-tokens, so they start fresh rather than as FFN copies")
    if config.model_type == "dynamic_moe" and not config.norm_topk_prob:
        reasons.append("top-p with raw probabilities scales each FFN output by its kept mass (norm_topk_prob=True fixes it)")
    if config.model_type == "hypermoe" and not options.zero_hyper_expert:
        reasons.append("HyperMoE adds a tiny generated adapter (about 1e-3 relative; zero_hyper_expert=True removes it)")
    if options.expert_noise_std or options.reinit_fraction:
        reasons.append("expert noise / Drop-Upcycling re-initialisation change the experts")
    return "; ".join(reasons) or None


def head_of(config, architecture: str | None = None) -> str:
    """The hf-moe head matching an architecture (default: the checkpoint's), e.g. `BertModel` -> "Model"."""
    architecture = architecture or (config.architectures or [None])[0]
    for head, auto_class in HEADS.items():
        model_class = auto_class._model_mapping.get(type(config), None)
        if model_class is not None and model_class.__name__ == architecture:
            return head
    return "Model"


# ---------------------------------------------------------------------------------------------------------------
# expert tensors


def expert_tensor(dense: dict, name: str, expert: int, layer_key: str, options: UpcycleOptions) -> torch.Tensor:
    """Expert `expert`'s copy of the dense FFN tensor `name` ([out, in] or bias), with noise and Drop-Upcycling."""
    tensor = dense[name].detach().clone()
    if options.reinit_fraction > 0 and name in _NEURON_AXIS:
        neurons = _dropped_neurons(dense, expert, layer_key, options)
        # gate_up_proj stacks two neuron-indexed blocks; down_proj indexes neurons by column
        blocks = tensor.chunk(2, dim=0) if name == "gate_up_proj" else [tensor]
        for part, block in enumerate(blocks):
            rows = block.t() if _NEURON_AXIS[name] == 1 else block
            if name.endswith("_bias"):
                rows[neurons] = 0
                continue
            # Drop-Upcycling: re-drawn from a normal with the dense matrix's own mean and std
            generator = _generator(options.seed, layer_key, expert, name, part)
            fresh = torch.randn(len(neurons), rows.shape[1], generator=generator) * rows.float().std() + rows.float().mean()
            rows[neurons] = fresh.to(tensor.dtype)
    if options.expert_noise_std > 0 and not name.endswith("_bias"):
        generator = _generator(options.seed + 1, layer_key, expert, name)
        noise = torch.randn(tensor.shape, generator=generator) * (options.expert_noise_std * tensor.float().std())
        tensor += noise.to(tensor.dtype)
    return tensor


_NEURON_AXIS = {"gate_up_proj": 0, "up_proj": 0, "up_proj_bias": 0, "down_proj": 1}  # down_proj_bias has none


def _dropped_neurons(dense, expert, layer_key, options):
    intermediate = dense["down_proj"].shape[1]
    generator = _generator(options.seed, layer_key, expert, "neurons")
    count = round(options.reinit_fraction * intermediate)
    return torch.randperm(intermediate, generator=generator)[:count]


def _generator(seed: int, *key) -> torch.Generator:
    # a stable per-(layer, expert, tensor) seed: streaming and in-memory conversions draw the same numbers
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(repr(key).encode()))


def finish_new_module(module, options: UpcycleOptions):
    """Apply the options to a freshly initialised hf-moe module (routers, HyperMoE generators)."""
    if isinstance(module, Router):
        if options.router_init == "zeros":
            torch.nn.init.zeros_(module.weight)
        elif options.router_init_std is not None:
            torch.nn.init.normal_(module.weight, std=options.router_init_std, generator=_generator(options.seed, "router"))
    if isinstance(module, HyperExpertGenerator) and options.zero_hyper_expert:
        for head in (module.weight_down, module.bias_down, module.weight_up, module.bias_up):
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)


def _paired_moe_blocks(dense_backbone, moe_model):
    """(layer key, dense layer, MoE layer, MoE block) for every MoE layer; both come from the same backbone class."""
    adapter = get_adapter(moe_model.config.text_config.model_type)
    moe_stacks = adapter.stacks(moe_model.backbone)
    for stack, dense_layers in adapter.stacks(dense_backbone).items():
        for idx, (dense_layer, moe_layer) in enumerate(zip(dense_layers, moe_stacks[stack])):
            block = next((m for m in moe_layer.modules() if isinstance(m, MoeFeedForward)), None)
            if block is not None:
                yield f"{stack}.{idx}", dense_layer, moe_layer, block


# ---------------------------------------------------------------------------------------------------------------
# in memory


@torch.no_grad()
def upcycle_model(
    dense_model: PreTrainedModel,
    family: str,
    *,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    moe_layers: list[int] | None = None,
    options: UpcycleOptions = UpcycleOptions(),
    **family_options,
) -> PreTrainedModel:
    """A loaded dense transformers model -> the same model as an MoE of `family` (a model type, e.g. "hypermoe")."""
    dense_config = dense_model.config
    config = build_moe_config(dense_config, family, num_experts, num_experts_per_tok, moe_layers, **family_options)
    model_class = MODEL_CLASSES[FAMILY_BY_MODEL_TYPE[family], head_of(dense_config, type(dense_model).__name__)]
    torch.manual_seed(options.seed)
    moe = model_class(config).to(dense_model.dtype)
    dense_state = dense_model.state_dict()
    result = moe.backbone.load_state_dict(dense_state, strict=False)
    ffn_keys = set(dense_state) - set(moe.backbone.state_dict())
    if set(result.unexpected_keys) - ffn_keys:
        raise ValueError(f"Dense weights without a place in the MoE model: {sorted(result.unexpected_keys)[:5]}")
    for layer_key, dense_layer, _, block in _paired_moe_blocks(dense_model, moe):
        if block.moe.config.model_type == "mh_moe":
            continue  # sub-token experts cannot be FFN copies (methods.md §4.1)
        dense = get_adapter(config.text_config.model_type).dense_ffn_weights(dense_layer)
        for name, param in block.moe.experts.named_parameters():
            param.copy_(torch.stack([expert_tensor(dense, name, e, layer_key, options) for e in range(num_experts)]))
    for module in moe.modules():
        finish_new_module(module, options)
    if note := function_preservation_note(config, options):
        logger.warning("Not function-preserving at step 0: %s.", note)
    return moe.train(dense_model.training)


# ---------------------------------------------------------------------------------------------------------------
# streaming


@sigterm_as_interrupt()
def upcycle(
    source: str,
    output_dir: str,
    family: str,
    *,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    moe_layers: list[int] | None = None,
    options: UpcycleOptions = UpcycleOptions(),
    overwrite: bool = False,
    verify: bool = False,
    max_shard_size: int = 2 * 1024**3,
    revision: str | None = None,
    gguf_file: str | None = None,
    progress=True,
    **family_options,
) -> Path:
    """Upcycle a dense checkpoint (local folder or Hub id; `gguf_file` for GGUF through transformers' loader) into
    an MoE checkpoint folder at `output_dir` that loads with `from_pretrained`. Returns the output path.

    The output is written to a temporary folder next to the target and renamed into place only when complete; an
    existing target is refused unless `overwrite`, and so is a target that is, contains or lies inside the source.
    Every non-weight file of the source (tokenizer, sentence-transformers modules, licenses, ...) is carried over.
    With `verify`, source and result are run on sample inputs and the gap of every output (max |delta|, relative
    error, KL for logits) is logged, written to `verification.json` and shown in the model card. `progress`: True for
    a tqdm bar, False for none, or your own tqdm-like object (`reset(total=...)` and `update(n)`, in bytes).

    Ctrl-C or SIGTERM raise KeyboardInterrupt once the partial output is removed; a full disk or a read-only target
    raise an OSError naming the target.
    """
    from .sources import resolve_source

    target = Path(output_dir).expanduser().resolve()
    refuse_existing(target, overwrite)
    folder = resolve_source(str(source), revision=revision, gguf_file=gguf_file)
    refuse_overlap(folder, target)
    with staged_output(target) as staging:
        carried = carry_source_files(folder, staging)
        if gguf_file is not None:
            moe = _upcycle_gguf(folder, gguf_file, staging, family, num_experts, num_experts_per_tok, moe_layers,
                                options, family_options)
        else:
            moe = _upcycle_streaming(folder, staging, family, num_experts, num_experts_per_tok, moe_layers, options,
                                     max_shard_size, progress, family_options)
        note = function_preservation_note(moe.config, options)
        report = _verify(folder, staging, gguf_file) if verify else None
        section = _conversion_card_section(source_name(source), gguf_file, moe.config, options, family_options, note,
                                           carried, report)
        write_conversion_card(moe, staging, source, folder, section)
    return target


def _upcycle_streaming(folder, staging, family, num_experts, top_k, moe_layers, options, max_shard_size, progress,
                       family_options):
    """Write the MoE checkpoint's weights, config and modeling code into `staging`; returns the (meta) MoE model."""
    dense_config = AutoConfig.from_pretrained(folder)
    config = build_moe_config(dense_config, family, num_experts, top_k, moe_layers, **family_options)
    head = head_of(dense_config)
    with torch.device("meta"):
        moe = MODEL_CLASSES[FAMILY_BY_MODEL_TYPE[family], head](config)
        dense = HEADS[head].from_config(dense_config)
    source = SafetensorsSource(folder)
    plan = StreamingPlan(source, dense, moe, options)
    total = sum(plan.nbytes(name) for name in plan.specs)
    if progress is True:
        from tqdm.auto import tqdm

        with tqdm(total=total, unit="B", unit_scale=True, desc="upcycling") as bar:
            write_sharded(staging, plan.specs, plan.produce, max_shard_size, bar)
    else:
        if progress:
            progress.reset(total=total)
        write_sharded(staging, plan.specs, plan.produce, max_shard_size, progress or None)
    config.architectures = [type(moe).__name__]
    custom_object_save(moe, staging, config=config)  # modeling files + auto_map, as save_pretrained does
    config.save_pretrained(staging)
    if note := function_preservation_note(config, options):
        logger.warning("Not function-preserving at step 0: %s. Run with verify to measure the gap.", note)
    return moe


class StreamingPlan:
    """Which output tensor comes from where: a renamed source tensor, expert copies of a dense FFN, or a new
    hf-moe parameter (router, generator, ...) initialised on the spot. Produces one tensor (or one expert) at a time."""

    def __init__(self, source: SafetensorsSource, dense, moe, options: UpcycleOptions):
        self.source, self.dense, self.moe, self.options = source, dense, moe, options
        self.dtype = _checkpoint_dtype(source, moe.config)
        prefix = "model." if moe.backbone_prefix is None else f"model.{moe.backbone_prefix}."
        dense_shapes = {key: tuple(tensor.shape) for key, tensor in dense.state_dict().items()}
        for key in source.keys():
            if key in dense_shapes and source.shape(key) != dense_shapes[key]:
                raise ValueError(f"Tensor {key!r} has shape {source.shape(key)} in the source, but its config implies "
                                 f"{dense_shapes[key]}: the checkpoint does not match its config.json.")
        self.copied = {prefix + key: key for key in source.keys() if key in dense_shapes}
        self.expert_params = {}  # output name -> (layer key, dense layer, param name)
        self.ffn_keys = {}  # layer key -> source keys of the dense FFN (what the MoE layer no longer has)
        for layer_key, dense_layer, moe_layer, block in _paired_moe_blocks(dense, moe):
            if moe.config.model_type == "mh_moe":
                continue
            layer_path = _module_path(dense, dense_layer)
            moe_names = {name for name, _ in moe_layer.named_parameters()}
            self.ffn_keys[layer_key] = {
                f"{layer_path}.{name}": name for name, _ in dense_layer.named_parameters() if name not in moe_names
            }
            experts_path = _module_path(moe, block.moe.experts)
            for param_name, _ in block.moe.experts.named_parameters():
                self.expert_params[f"{experts_path}.{param_name}"] = (layer_key, dense_layer, param_name)
        tied = set(moe.get_expanded_tied_weights_keys(all_submodels=True))
        state = moe.state_dict()
        self.specs = {
            name: (tuple(tensor.shape), self.dtype if tensor.is_floating_point() else tensor.dtype)
            for name, tensor in state.items()
            if not (name in tied and name not in self.copied)
        }
        self.new_params = [n for n in self.specs if n not in self.copied and n not in self.expert_params]
        self.units = _init_units(moe, self.new_params)
        self._dense_cache = (None, None)

    def nbytes(self, name):
        shape, dtype = self.specs[name]
        return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()

    def produce(self, name):
        if name in self.copied:
            yield self.source.get(self.copied[name]).to(self.specs[name][1])
        elif name in self.expert_params:
            layer_key, dense_layer, param_name = self.expert_params[name]
            dense = self._dense_ffn(layer_key, dense_layer)
            for expert in range(self.moe.config.num_experts):
                yield expert_tensor(dense, param_name, expert, layer_key, self.options).to(self.dtype)
        else:
            yield self._new_param(name)

    def _dense_ffn(self, layer_key, dense_layer):
        """The dense FFN weights of one layer as one expert; only the current layer is kept in memory."""
        if self._dense_cache[0] != layer_key:
            tensors = {name: self.source.get(key) for key, name in self.ffn_keys[layer_key].items()}
            dense_layer.load_state_dict(tensors, strict=False, assign=True)
            adapter = get_adapter(self.moe.config.text_config.model_type)
            self._dense_cache = (layer_key, {k: v.detach() for k, v in adapter.dense_ffn_weights(dense_layer).items()})
            dense_layer.to("meta")
        return self._dense_cache[1]

    @torch.no_grad()
    def _new_param(self, name):
        unit = self.units[name]
        if not getattr(unit, "_hf_moe_materialized", False):
            for owner in {_owner(self.moe, n) for n, u in self.units.items() if u is unit}:
                owner.to_empty(device="cpu", recurse=False)
                owner.to(self.dtype)
            torch.manual_seed(self.options.seed + zlib.crc32(_module_path(self.moe, unit).encode()))
            unit.reset_parameters()
            finish_new_module(unit, self.options)
            unit._hf_moe_materialized = True
        return getattr(_owner(self.moe, name), name.rsplit(".", 1)[1]).detach().to(self.dtype)  # parameter or buffer


def _init_units(moe, names):
    """For each new parameter, the hf-moe module whose `reset_parameters` initialises it."""
    units = {}
    for name in names:
        path = name.rsplit(".", 1)[0]
        unit = None
        while True:
            module = moe.get_submodule(path)
            if isinstance(module, CUSTOM_INIT_MODULES) and _covers(module, moe, name):
                unit = module
                break
            if not path:
                break
            path = path.rsplit(".", 1)[0] if "." in path else ""
        if unit is None:
            raise ValueError(f"The source checkpoint has no tensor for {name!r} and hf-moe cannot initialise it.")
        units[name] = unit
    return units


def _covers(unit, moe, name) -> bool:
    """Whether `unit.reset_parameters` initialises parameter `name` (nested hf-moe modules initialise their own)."""
    unit_path = _module_path(moe, unit)
    relative = name[len(unit_path) + 1 :] if unit_path else name
    parts = relative.split(".")[:-1]
    module = unit
    for part in parts:
        module = getattr(module, part)
        if isinstance(module, CUSTOM_INIT_MODULES):
            return False
    return True


def _owner(moe, name):
    return moe.get_submodule(name.rsplit(".", 1)[0])


def _module_path(root, module) -> str:
    for path, candidate in root.named_modules():
        if candidate is module:
            return path
    raise KeyError(module)


def _checkpoint_dtype(source, config) -> torch.dtype:
    if isinstance(config.text_config.dtype, torch.dtype):
        return config.text_config.dtype
    for name in source.keys():
        tensor = source.get(name)
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _upcycle_gguf(folder, gguf_file, staging, family, num_experts, top_k, moe_layers, options, family_options):
    """GGUF goes through transformers' loader (dequantised in memory), then the in-memory conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    moe = upcycle_model(dense, family, num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=moe_layers,
                        options=options, **family_options)
    moe.save_pretrained(staging)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(staging)  # the GGUF holds it
    return moe


def _verify(folder, staging, gguf_file) -> dict:
    from transformers import AutoTokenizer

    from .verify import compare_outputs

    converted_config = AutoConfig.from_pretrained(staging)
    head = HEADS[head_of(converted_config)]
    source = head.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    converted = head.from_pretrained(staging, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(staging)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    report = compare_outputs(source, converted, tokenizer)
    (staging / "verification.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.warning("Verification against the source: %s", json.dumps(report))
    return report


def _conversion_card_section(source, gguf_file, config, options, family_options, note, carried, report) -> str:
    origin = f"`{gguf_file}` of `{source}`" if gguf_file else f"`{source}`"
    settings = {"num_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok,
                **family_options, **asdict(options)}
    preserving = "no — " + note if note else "yes (every expert is the dense FFN)"
    lines = [
        "## Conversion",
        "",
        f"Upcycled by `hf_moe.conversion.upcycle` from {origin} into `{config.model_type}`, with these options:",
        "",
        *(f"- `{name}`: {value}" for name, value in settings.items()),
        "",
        f"Function-preserving at step 0: {preserving}.",
        "",
        carried_files_line(carried),
    ]
    if report is not None:
        lines += [
            "",
            "## Verification",
            "",
            "Source and converted model run on the same sample inputs (`verification.json`):",
            "",
            "| output | max abs diff | relative error | KL(source ‖ converted) |",
            "|---|---|---|---|",
            *(
                f"| {name} | {f['max_abs_diff']:.2e} | {f['relative_error']:.2e} | "
                f"{format(f['kl'], '.2e') if 'kl' in f else '—'} |"
                for name, f in report["outputs"].items()
            ),
        ]
    return "\n".join(lines) + "\n"
