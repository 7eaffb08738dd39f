"""Lazy reading and streaming writing of sharded safetensors checkpoints, so conversions hold one tensor at a time.

`safetensors.torch.save_file` needs every tensor of a shard in memory; here the header of each shard is written from
the planned shapes first, and tensor bytes follow as they are produced (same file format, same index layout as
transformers' `save_pretrained`).
"""

import json
import struct
from pathlib import Path, PurePath

import torch
from safetensors import SafetensorError, safe_open

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def inside_folder(folder: Path, name: str) -> Path:
    """`folder / name`, refusing a name that leads out of the folder (`..`, an absolute path, a symlink out of it), so
    that a checkpoint cannot make a conversion read, and copy into its output, any other file. The one way out allowed
    is a symlink into huggingface_hub's blob store (`models--<org>--<name>/blobs/`), as in the Hub cache's snapshots
    and older `--local-dir` downloads: only Hub content lies there, and Hub repositories cannot hold symlinks."""
    folder = Path(folder).resolve()
    resolved = (folder / name).resolve()
    hub_blob = resolved.parent.name == "blobs" and resolved.parent.parent.name.startswith("models--")
    escapes = PurePath(name).is_absolute() or ".." in PurePath(name).parts
    if escapes or not (resolved.is_relative_to(folder) or hub_blob):
        raise ValueError(f"{name!r} lies outside the source folder {folder} (it resolves to {resolved}); hf-moe only "
                         "reads files inside the source folder.")
    return folder / name


class SafetensorsSource:
    """The tensors of a checkpoint folder (`model.safetensors` or a sharded index), read one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / SAFE_WEIGHTS_INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            for filename in set(weight_map.values()):
                inside_folder(self.folder, filename)
        elif (self.folder / SAFE_WEIGHTS_NAME).exists():
            weight_map = dict.fromkeys(self._open(SAFE_WEIGHTS_NAME).keys(), SAFE_WEIGHTS_NAME)
        else:
            raise FileNotFoundError(
                f"No {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {self.folder}: hf-moe converts safetensors "
                "checkpoints (load other formats with transformers and `save_pretrained` them first)."
            )
        self.weight_map = weight_map
        self._handles = {}

    def _open(self, filename: str):
        path = self.folder / filename
        if not path.exists():
            raise FileNotFoundError(f"Shard {path} named by the checkpoint index is missing.")
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Shard {path} is not a readable safetensors file ({error}).") from error

    def keys(self):
        return self.weight_map.keys()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except (SafetensorError, OSError) as error:
            path = self.folder / self.weight_map[name]
            raise ValueError(f"Tensor {name!r} in {path} cannot be read ({error}).") from error

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the shard's header (nothing is read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def _handle(self, name: str):
        filename = self.weight_map[name]
        if filename not in self._handles:
            self._handles = {filename: self._open(filename)}  # keep one shard open: bounded memory
        return self._handles[filename]


def plan_shards(specs: dict, max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own shard)."""
    shards, current, size = [], [], 0
    for name, (shape, dtype) in specs.items():
        nbytes = _nbytes(shape, dtype)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_sharded(folder: Path, specs: dict, produce, max_shard_bytes: int, progress=None) -> list[str]:
    """Write the tensors `specs` ({name: (shape, dtype)}) into `folder` as transformers-style shards.

    `produce(name)` yields the tensor's contents as consecutive chunks (tensors of `dtype` whose bytes concatenate to
    the whole tensor), so an [E, ...] expert tensor can be written one expert at a time.
    """
    shards = plan_shards(specs, max_shard_bytes)
    filenames = (
        [SAFE_WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for filename, names in zip(filenames, shards):
        _write_shard(Path(folder) / filename, names, specs, produce, progress)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(*spec) for spec in specs.values())},
            "weight_map": {name: filename for filename, names in zip(filenames, shards) for name in names},
        }
        (Path(folder) / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return filenames


def _write_shard(path: Path, names: list[str], specs: dict, produce, progress):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        shape, dtype = specs[name]
        nbytes = _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name in names:
            shape, dtype = specs[name]
            written = 0
            for chunk in produce(name):
                if chunk.dtype != dtype:
                    raise TypeError(f"{name}: produced {chunk.dtype}, planned {dtype}")
                data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                written += data.nbytes
            if written != _nbytes(shape, dtype):
                raise RuntimeError(f"{name}: wrote {written} bytes, planned {_nbytes(shape, dtype)}")
            if progress is not None:
                progress.update(written)


def _nbytes(shape, dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * torch.empty((), dtype=dtype).element_size()
