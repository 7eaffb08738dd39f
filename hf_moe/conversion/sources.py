"""Where a conversion reads from: a local checkpoint folder, or a Hub model id fetched with huggingface_hub."""

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError

_CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.gguf"]


def resolve_source(source: str, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """The local folder holding `source`: itself if it is a folder, else the Hub snapshot of that model id (the
    standard Hub cache, so `HF_HUB_OFFLINE=1` reads a cached snapshot)."""
    path = Path(source)
    if path.is_dir():
        return path
    patterns = [gguf_file, "*.json", "tokenizer*"] if gguf_file else _CHECKPOINT_FILES
    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
    except (HFValidationError, OSError) as error:
        raise FileNotFoundError(
            f"Source {source!r} is neither a local folder nor a Hub model id that could be fetched ({error})."
        ) from error
