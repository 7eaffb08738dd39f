"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): a dense checkpoint becomes an MoE of any family with
every expert a copy of the dense FFN, optionally perturbed (noise) or partly re-initialised (Drop-Upcycling, Nakamura
et al., ICLR 2025, arXiv 2502.19261).

Two entry points: `upcycle_model` converts a loaded dense model in memory; `upcycle` streams a safetensors checkpoint
(local folder or Hub id) into a checkpoint folder, tensor by tensor, so peak memory stays near one FFN matrix whatever
the model size. Both build the same tensors from the same seed (docs/upcycling.md §1-§4).
"""

import functools
import logging
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from ..modeling import HEADS, MODEL_CLASSES, MoeFeedForward, get_adapter, get_family
from .output import Converted, source_name, write_conversion
from .safetensors_io import SafetensorsSource
from .streaming import StreamingPlan, checkpoint_dtype
from .structure import (
    build_moe_config,
    head_of,
    initialise_new_modules,
    module_path,
    why_not_exact,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpcycleOptions:
    """How experts and routers start. Defaults keep the dense function wherever the family allows it."""

    expert_noise_std: float = 0.0  # Gaussian noise on each expert copy, relative to each weight matrix's std
    reinit_fraction: float = 0.0  # Drop-Upcycling: fraction of each expert's FFN neurons re-initialised
    router_init: str = "normal"  # "normal" (std below) or "zeros"
    router_init_std: float | None = None  # None: the config's initializer_range
    zero_hyper_expert: bool = False  # zero what the family adds to the experts (HyperMoE: the HyperExpert starts at 0)
    seed: int = 0

    def __post_init__(self):
        if self.router_init not in ("normal", "zeros"):
            raise ValueError(f"router_init={self.router_init!r} must be 'normal' or 'zeros'.")
        if self.expert_noise_std < 0:
            raise ValueError(f"expert_noise_std={self.expert_noise_std} must be >= 0.")
        if not 0 <= self.reinit_fraction <= 1:
            raise ValueError(f"reinit_fraction={self.reinit_fraction} must be in [0, 1].")


def _not_exact(config, options: UpcycleOptions) -> str | None:
    changes = ["expert noise / Drop-Upcycling re-initialisation change the experts"]
    return why_not_exact(
        config, options.zero_hyper_expert, changes if options.expert_noise_std or options.reinit_fraction else ()
    )


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
            fresh = (
                torch.randn(len(neurons), rows.shape[1], generator=generator) * rows.float().std()
                + rows.float().mean()
            )
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


def finish_new_module(module, family, options: UpcycleOptions):
    """Apply the options to a freshly initialised hf-moe module of `family` (routers: the modules with
    `init_trainable`; what the family adds)."""
    if hasattr(module, "init_trainable"):
        if options.router_init == "zeros":
            module.init_trainable(0.0)
        elif options.router_init_std is not None:
            module.init_trainable(options.router_init_std, _generator(options.seed, "router"))
    if options.zero_hyper_expert and family.zero_added_output is not None:
        family.zero_added_output(module)


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
    """A loaded dense transformers model -> the same model as an MoE of `family` (a model type, e.g. "hypermoe"),
    with the tensors the streaming `upcycle` writes for the same seed."""
    config = build_moe_config(
        dense_model.config, family, num_experts, num_experts_per_tok, moe_layers, **family_options
    )
    moe = _upcycle_loaded(dense_model, config, options)
    if note := _not_exact(config, options):
        logger.warning("Not function-preserving at step 0: %s.", note)
    return moe


@torch.no_grad()
def _upcycle_loaded(dense_model, config, options: UpcycleOptions):
    head = head_of(dense_model.config, type(dense_model).__name__) or "Model"
    moe_family = get_family(config.model_type)
    with torch.random.fork_rng(devices=[]):
        moe = MODEL_CLASSES[moe_family.class_prefix, head](config).to(dense_model.dtype)
        initialise_new_modules(
            moe, options.seed, functools.partial(finish_new_module, family=moe_family, options=options)
        )
    dense_state = dense_model.state_dict()
    result = moe.load_state_dict(dense_state, strict=False)  # the MoE model has the dense model's keys
    ffn_keys = set(dense_state) - set(moe.state_dict())
    if set(result.unexpected_keys) - ffn_keys:
        raise ValueError(f"Dense weights without a place in the MoE model: {sorted(result.unexpected_keys)[:5]}")
    adapter = get_adapter(config.text_config.model_type)
    if not moe_family.experts_from_dense_ffn:  # e.g. sub-token experts (docs/upcycling.md §3)
        return moe.train(dense_model.training)
    for layer_key, dense_layer, _, block in _paired_moe_blocks(dense_model, moe):
        dense = adapter.dense_ffn_weights(dense_layer)
        for name, param in block.moe.experts.named_parameters():
            param.copy_(
                torch.stack([expert_tensor(dense, name, e, layer_key, options) for e in range(config.num_experts)])
            )
    return moe.train(dense_model.training)


# ---------------------------------------------------------------------------------------------------------------
# streaming


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
    raise an OSError naming the target (docs/upcycling.md §4).
    """

    def convert(folder, staging):
        dense = _load_gguf(folder, gguf_file) if gguf_file else None
        dense_config = AutoConfig.from_pretrained(folder) if dense is None else dense.config
        config = build_moe_config(dense_config, family, num_experts, num_experts_per_tok, moe_layers, **family_options)
        if dense is None:
            moe = _upcycle_streaming(folder, staging, dense_config, config, options, max_shard_size, progress)
        else:
            moe = _upcycle_loaded(dense, config, options)
            moe.save_pretrained(staging)
            AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(staging)  # the GGUF holds it
        note = _not_exact(config, options)
        if note:
            logger.warning("Not function-preserving at step 0: %s. Run with verify to measure the gap.", note)
        origin = f"`{gguf_file}` of `{source_name(source)}`" if gguf_file else f"`{source_name(source)}`"
        return Converted(
            model=moe,
            summary=f"Upcycled by `hf_moe.conversion.upcycle` from {origin} into `{family}`, with these options:",
            settings={"num_experts": num_experts, "num_experts_per_tok": num_experts_per_tok, **family_options,
                      **asdict(options)},
            exactness="Function-preserving at step 0: "
            f"{'no — ' + note if note else 'yes (every expert is the dense FFN)'}.",
        )

    return write_conversion(source, output_dir, convert, overwrite=overwrite, verify=verify, revision=revision,
                            gguf_file=gguf_file)


def _load_gguf(folder, gguf_file):
    """GGUF goes through transformers' loader (dequantised to float32 in memory), then the in-memory conversion."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)


def _upcycle_streaming(folder, staging, dense_config, config, options, max_shard_size, progress):
    """Write the MoE checkpoint (weights, config, modeling code) into `staging`; returns the (meta) MoE model."""
    head = head_of(dense_config) or "Model"
    moe_family = get_family(config.model_type)
    with torch.device("meta"):
        moe = MODEL_CLASSES[moe_family.class_prefix, head](config)
        dense = HEADS[head].from_config(dense_config)
    source = SafetensorsSource(folder)
    dense_shapes = {key: tuple(tensor.shape) for key, tensor in dense.state_dict().items()}
    for key in source.weight_map:
        if key in dense_shapes and source.shape(key) != dense_shapes[key]:
            raise ValueError(f"Tensor {key!r} has shape {source.shape(key)} in the source, but its config implies "
                             f"{dense_shapes[key]}: the checkpoint does not match its config.json.")
    plan = StreamingPlan(moe, _origins(source, dense, moe, options), checkpoint_dtype(source, config.text_config.dtype),
                         options.seed, functools.partial(finish_new_module, family=moe_family, options=options))
    plan.save(staging, max_shard_size, progress)
    return moe


def _origins(source, dense, moe, options) -> dict:
    """Where each output tensor comes from: the source tensor of the same name (the MoE model has the dense model's
    keys), or the expert copies of a dense FFN tensor, one expert at a time, from the current layer's dense FFN (the
    only one kept in memory)."""
    outputs = set(moe.state_dict())
    origins = {
        key: functools.partial(lambda key: [source.get(key)], key) for key in source.weight_map if key in outputs
    }
    if not moe.family.experts_from_dense_ffn:
        return origins  # e.g. sub-token experts start fresh (docs/upcycling.md §3)
    dense_ffn = _DenseFfn(source, moe.config.text_config)
    for layer_key, dense_layer, moe_layer, block in _paired_moe_blocks(dense, moe):
        layer_path = module_path(dense, dense_layer)
        moe_names = {name for name, _ in moe_layer.named_parameters()}
        ffn_keys = {f"{layer_path}.{name}": name for name, _ in dense_layer.named_parameters() if name not in moe_names}
        experts = module_path(moe, block.moe.experts)
        for param_name, _ in block.moe.experts.named_parameters():
            origins[f"{experts}.{param_name}"] = functools.partial(
                _expert_copies, dense_ffn, layer_key, dense_layer, ffn_keys, param_name, moe.config.num_experts, options
            )
    return origins


def _expert_copies(dense_ffn, layer_key, dense_layer, ffn_keys, param_name, num_experts, options):
    dense = dense_ffn(layer_key, dense_layer, ffn_keys)
    for expert in range(num_experts):
        yield expert_tensor(dense, param_name, expert, layer_key, options)


class _DenseFfn:
    """The dense FFN weights of one layer, read into its meta layer; only the current layer is kept in memory."""

    def __init__(self, source, text_config):
        self.source, self.adapter = source, get_adapter(text_config.model_type)
        self.layer_key, self.weights = None, None

    def __call__(self, layer_key, dense_layer, ffn_keys):
        if self.layer_key != layer_key:
            tensors = {name: self.source.get(key) for key, name in ffn_keys.items()}
            dense_layer.load_state_dict(tensors, strict=False, assign=True)
            self.weights = {k: v.detach() for k, v in self.adapter.dense_ffn_weights(dense_layer).items()}
            self.layer_key = layer_key
            dense_layer.to("meta")
        return self.weights
