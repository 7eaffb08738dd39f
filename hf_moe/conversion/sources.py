"""Where a conversion reads from: a local checkpoint folder, or a Hub model id fetched with huggingface_hub
(docs/upcycling.md §4)."""

from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HFValidationError

# weight files of a model in any format, and exported copies of it: a conversion reads safetensors (or the GGUF file it
# is given) and carries none of them into its output
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".ot",
                   ".tflite", ".gguf")
EXPORT_FOLDERS = ("onnx", "openvino")


def resolve_source(source: str, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """The local folder holding `source`: itself if it is a folder, else the Hub snapshot of that model id (the
    standard Hub cache, so `HF_HUB_OFFLINE=1` reads a cached snapshot): every file but the weights the conversion does
    not read (other formats, exported copies), as every other file is carried into the output."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise FileNotFoundError(f"Source {path} is a file, not a folder: give the checkpoint's folder "
                                "(for a GGUF file, its folder and gguf_file / --gguf-file).")
    if _looks_like_path(source):
        raise FileNotFoundError(f"Source folder {path.absolute()} does not exist.")
    # for GGUF, every weight file but the one asked for (a GGUF repository holds many quantisations)
    ignore = [f"*{suffix}" for suffix in WEIGHT_SUFFIXES if gguf_file or suffix != ".safetensors"]
    ignore += [f"{folder}/*" for folder in EXPORT_FOLDERS]
    try:
        if gguf_file:
            hf_hub_download(source, gguf_file, revision=revision)
        return Path(snapshot_download(source, revision=revision, ignore_patterns=ignore))
    except (HFValidationError, OSError) as error:
        raise FileNotFoundError(
            f"Source {source!r} is neither a local folder nor a Hub model id that could be fetched ({error})."
        ) from error


def _looks_like_path(source: str) -> bool:
    """Whether `source` can only be meant as a local path: a Hub id is `name` or `org/name`, never starts with "." or
    "~", and has no first part that exists here."""
    parts = Path(source).parts
    return source.startswith((".", "~")) or Path(source).is_absolute() or len(parts) > 2 or Path(parts[0]).exists()
