"""Writing an hf-moe checkpoint tensor by tensor from a source checkpoint, so that a conversion holds about one tensor
in memory whatever the model size (docs/upcycling.md §4): the output model exists only on the `meta` device, each
output tensor is produced when its shard is written, from the source or initialised on the spot."""

import copy
import functools

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)
from transformers.dynamic_module_utils import custom_object_save

from .safetensors_io import SafetensorsSource, write_sharded
from .structure import init_seed, module_path


class ModelCheckpoint:
    """The tensors of a checkpoint folder under the state-dict names of the transformers model that loads it, read one
    at a time: transformers' own weight conversions apply as in `from_pretrained` (e.g. Mixtral's per-expert
    `w1`/`w3` checkpoint tensors become one `mlp.experts.gate_up_proj`). `meta_model` is that model on `meta`."""

    def __init__(self, source: SafetensorsSource, meta_model):
        transforms = get_model_conversion_mapping(meta_model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        state = meta_model.state_dict()
        self.source = source
        self.origins = {}  # model key -> (converter or None, [(source pattern, checkpoint key)])
        for key in sorted(source.keys(), key=dot_natural_key):  # transformers' order: experts 0, 1, ..., 10
            name, pattern = rename_source_key(key, renamings, converters, meta_model.base_model_prefix, state)
            if name not in state and key in state:
                name, pattern = key, None
            if name in state:
                converter = next((c for c in converters if pattern in c.source_patterns), None) if pattern else None
                self.origins.setdefault(name, (converter, []))[1].append((pattern, key))

    def keys(self):
        return self.origins.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.origins

    def get(self, name: str) -> torch.Tensor:
        converter, parts = self.origins[name]
        if converter is None:
            return self.source.get(parts[0][1])
        converter = copy.deepcopy(converter)
        for pattern, key in parts:
            converter.add_tensor(name, key, pattern, functools.partial(self.source.get, key))
        return converter.convert(name)[name]


class StreamingPlan:
    """Every tensor of the output model `moe` (on `meta`) and where it comes from. `origins` maps output names to
    functions yielding their contents as consecutive chunks (the whole tensor, or its rows along dim 0 one at a time,
    e.g. one expert); every other parameter is new and is initialised on the spot by its hf-moe module's own
    `reset_parameters` (seeded per module, as `initialise_new_modules` does in memory), then `finish(module)`."""

    def __init__(self, moe, origins: dict, dtype: torch.dtype, seed: int, finish):
        self.moe, self.origins, self.dtype, self.seed, self.finish = moe, origins, dtype, seed, finish
        tied = set(moe.get_expanded_tied_weights_keys(all_submodels=True))
        self.specs = {
            name: (tuple(tensor.shape), dtype if tensor.is_floating_point() else tensor.dtype)
            for name, tensor in moe.state_dict().items()
            if not (name in tied and name not in origins)
        }
        self.units = _init_units(moe, [name for name in self.specs if name not in origins])

    def nbytes(self, name):
        shape, dtype = self.specs[name]
        return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()

    def produce(self, name):
        if name not in self.origins:
            yield self._new_param(name)
            return
        shape = self.specs[name][0]
        for chunk in self.origins[name]():
            if tuple(chunk.shape) not in (shape, shape[1:]):
                raise ValueError(f"The source's tensor for {name!r} has shape {tuple(chunk.shape)}, but the converted "
                                 f"config implies {shape}: the checkpoint does not match its config.json.")
            yield chunk.to(self.specs[name][1])

    def save(self, folder, max_shard_size: int, progress):
        """Write the model into `folder` as `save_pretrained` would: weight shards, config, and the modeling files
        with their `auto_map`. `progress`: True for a tqdm bar, False for none, or a tqdm-like object."""
        total = sum(self.nbytes(name) for name in self.specs)
        if progress is True:
            from tqdm.auto import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, desc="converting") as bar:
                write_sharded(folder, self.specs, self.produce, max_shard_size, bar)
        else:
            if progress:
                progress.reset(total=total)
            write_sharded(folder, self.specs, self.produce, max_shard_size, progress or None)
        self.moe.config.architectures = [type(self.moe).__name__]
        custom_object_save(self.moe, folder, config=self.moe.config)
        self.moe.config.save_pretrained(folder)

    @torch.no_grad()
    def _new_param(self, name):
        unit = self.units[name]
        if not getattr(unit, "_hf_moe_materialized", False):
            for owner in {_owner(self.moe, n) for n, u in self.units.items() if u is unit}:
                owner.to_empty(device="cpu", recurse=False)
                owner.to(self.dtype)
            torch.manual_seed(init_seed(self.seed, self.moe, module_path(self.moe, unit)))
            unit.reset_parameters()
            self.finish(unit)
            unit._hf_moe_materialized = True
        return getattr(_owner(self.moe, name), name.rsplit(".", 1)[1]).detach().to(self.specs[name][1])


def _init_units(moe, names):
    """For each new parameter, the hf-moe module whose `reset_parameters` initialises it."""
    units, init_types = {}, moe.init_module_types
    for name in names:
        path = name.rsplit(".", 1)[0]
        unit = None
        while True:
            module = moe.get_submodule(path)
            if isinstance(module, init_types) and _covers(module, moe, name, init_types):
                unit = module
                break
            if not path:
                break
            path = path.rsplit(".", 1)[0] if "." in path else ""
        if unit is None:
            raise ValueError(f"The source checkpoint has no tensor for {name!r} and hf-moe cannot initialise it.")
        units[name] = unit
    return units


def _covers(unit, moe, name, init_types) -> bool:
    """Whether `unit.reset_parameters` initialises parameter `name` (nested hf-moe modules initialise their own)."""
    unit_path = module_path(moe, unit)
    relative = name[len(unit_path) + 1 :] if unit_path else name
    module = unit
    for part in relative.split(".")[:-1]:
        module = getattr(module, part)
        if isinstance(module, init_types):
            return False
    return True


def _owner(moe, name):
    return moe.get_submodule(name.rsplit(".", 1)[0])


def checkpoint_dtype(source, config_dtype) -> torch.dtype:
    """The dtype the checkpoint is stored in: its config's, else that of its first floating tensor."""
    if isinstance(config_dtype, torch.dtype):
        return config_dtype
    for name in source.weight_map:
        tensor = source.get(name)
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
