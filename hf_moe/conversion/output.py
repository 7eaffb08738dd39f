"""The output folder of every conversion (docs/upcycling.md §4): `write_conversion` resolves the source, refuses a
target that exists or overlaps the source, writes into a staging folder next to the target that is renamed into place
only when complete and removed on any error, Ctrl-C or SIGTERM (the staging folders of killed runs are removed by the
next run), carries every non-weight file of the source over, verifies on request and writes a model card naming
where the model came from and why it is or is not the source's function."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, metadata_load
from safetensors import SafetensorError

from .safetensors_io import inside_folder
from .sources import EXPORT_FOLDERS, WEIGHT_SUFFIXES, resolve_source
from .verify import report_table, verify_conversion

logger = logging.getLogger(__name__)

# not carried: weight files and exported copies of the source model (none describes the converted model), and: the
# config and card the conversion writes, weight indexes, and the dense model's own code
_NOT_CARRIED = ("config.json", "README.md")
_NOT_CARRIED_SUFFIXES = (*WEIGHT_SUFFIXES, ".index.json", ".py", ".pyc")

# errors of writing the output that the user fixes (space, permissions), reported in one line
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@dataclass
class Converted:
    """What a conversion wrote into the staging folder, for the model card: the (meta) model, one sentence on what
    was done, the settings used, and the line saying whether it computes the source's function."""

    model: object
    summary: str
    settings: dict
    exactness: str


def write_conversion(source, output_dir, convert, *, overwrite: bool, verify: bool, revision: str | None = None,
                     gguf_file: str | None = None) -> Path:
    """Run `convert(folder, staging) -> Converted` on the resolved source folder into a staging folder that becomes
    `output_dir` once complete, with the source's other files, the optional verification and the model card."""
    target = Path(output_dir).expanduser().resolve()
    refuse_existing(target, overwrite)
    with sigterm_as_interrupt():
        folder = resolve_source(str(source), revision=revision, gguf_file=gguf_file)
        refuse_overlap(folder, target)
        with staged_output(target) as staging:
            carried = carry_source_files(folder, staging)
            converted = convert(folder, staging)
            report = verify_conversion(folder, staging, gguf_file) if verify else None
            write_conversion_card(converted.model, staging, source, folder, _card_section(converted, carried, report))
    return target


def _card_section(converted: Converted, carried: list[str], report: dict | None) -> str:
    settings = [f"- `{name}`: {value}" for name, value in converted.settings.items()] or ["- none"]
    lines = ["## Conversion", "", converted.summary, "", *settings, "", converted.exactness, "",
             carried_files_line(carried)]
    if report is not None:
        lines += ["", *report_table(report)]
    return "\n".join(lines) + "\n"


class OutputWriteError(OSError):
    """Writing the conversion output failed (disk full, read-only, not permitted); nothing was left behind."""

    def __str__(self):
        return f"Cannot write {self.filename}: {self.strerror}; nothing was left behind."


def refuse_existing(target: Path, overwrite: bool):
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it.")


def refuse_overlap(source: Path, target: Path):
    """Refuse a target that is the source folder, contains it (overwriting would delete it) or lies inside it."""
    source = Path(source).resolve()
    if target == source or target in source.parents:
        raise ValueError(f"The output {target} would replace the source folder {source}; choose another output.")
    if source in target.parents:
        raise ValueError(f"The output {target} lies inside the source folder {source}; choose one outside it.")


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that the cleanup of an interrupted conversion runs; the
    caller's handler is restored afterwards. Python runs signal handlers in the main thread only, so elsewhere this
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def staged_output(target: Path):
    """A new staging folder next to `target`, renamed to `target` (replacing it) when the block completes.

    On any error or interrupt the staging folder is removed, and so are the parent folders created for it; a write
    error the user can fix (disk full, read-only, permissions) becomes one `OutputWriteError` naming the path.
    """
    created = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    staging = target.parent / f".{target.name}.partial-{_owner_tag()}"
    try:
        _remove_stale_staging(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        yield staging
        _move_into_place(staging, target)
    except OSError as error:
        if error.errno not in _WRITE_ERRNOS or not _writing(error, staging, target):
            raise
        raise OutputWriteError(error.errno, error.strerror, str(target)) from error
    except SafetensorError as error:  # writing a shard with safetensors: the OS error comes as "... (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code is None or int(code[1]) not in _WRITE_ERRNOS:
            raise
        raise OutputWriteError(int(code[1]), os.strerror(int(code[1])), str(target)) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break


def _writing(error: OSError, staging: Path, target: Path) -> bool:
    """Whether `error` came from writing the output (a failed `write` names no file), not from reading the source."""
    paths = [Path(p) for p in (error.filename, error.filename2) if p is not None]
    return not paths or any(p == staging or staging in p.parents or p == target or p in target.parents for p in paths)


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())  # no "-": it separates the tag's fields


def _owner_tag() -> str:
    # host and process of the run that owns a staging folder, so that a later run can tell a dead run's folder
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale_staging(target: Path):
    """Remove the staging (and moved-aside) folders that dead runs on this host left next to `target`."""
    if os.name != "posix" or not target.parent.is_dir():
        return  # (elsewhere `os.kill(pid, 0)` does not merely probe)
    for kind in ("partial", "old"):
        prefix = f".{target.name}.{kind}-"
        for folder in target.parent.glob(f"{prefix}*"):
            owner = folder.name[len(prefix) :].split("-")
            if len(owner) != 3 or owner[0] != _host() or not owner[1].isdigit() or _alive(int(owner[1])):
                continue
            if kind == "old" and not target.exists():
                continue  # killed between the two renames: the previous output, kept
            shutil.rmtree(folder)
            logger.warning("Removed %s, left by an interrupted conversion (process %s).", folder, owner[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _move_into_place(staging: Path, target: Path):
    """Rename the finished folder into place; an existing target (overwrite) is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{_owner_tag()}"
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old)


def carry_source_files(folder: Path, staging: Path) -> list[str]:
    """Copy every file of the source folder that is not a weight file, an exported copy of the model, the config or
    card the conversion writes, code or a hidden file (tokenizer, generation config, sentence-transformers modules,
    licenses, ...), so any library that loaded the source loads the output the same way. Returns their paths."""
    folder = Path(folder)
    carried = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder)
        if path.is_dir() or not _carried(name):
            continue
        inside_folder(folder, str(name))  # a symlink out of the source is refused, as for shards
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, staging / name)
        carried.append(name.as_posix())
    return carried


def _carried(name: Path) -> bool:
    parts = name.parts
    if any(part.startswith(".") or part == "__pycache__" for part in parts) or parts[0] in EXPORT_FOLDERS:
        return False  # hidden files (.gitattributes, .cache/), caches, exported copies of the dense model
    if len(parts) == 1 and name.name in _NOT_CARRIED:
        return False
    return not name.name.endswith(_NOT_CARRIED_SUFFIXES)


def carried_files_line(carried: list[str]) -> str:
    return f"Files carried over from the source: {', '.join(f'`{name}`' for name in carried) or 'none'}."


def write_conversion_card(model, directory: Path, source: str, folder: Path, section: str):
    """The model's card with the conversion `section`, and as metadata the source (`base_model`: the Hub id or the
    folder's name, never a local path) and the source's license."""
    model.write_model_card(directory, extra=section)
    card = ModelCard.load(Path(directory) / "README.md")
    card.data.base_model = source_name(source)
    for field, value in source_license(folder).items():
        setattr(card.data, field, value)
    card.save(Path(directory) / "README.md")


def source_name(source) -> str:
    """How the card names the source: its Hub id, or the name of its local folder."""
    path = Path(source).expanduser()
    return path.resolve().name if path.is_dir() else str(source)


def source_license(folder: Path) -> dict:
    """The license fields of the source's card metadata, else of its config."""
    readme = Path(folder) / "README.md"
    metadata = metadata_load(readme) if readme.is_file() else None
    if not metadata or "license" not in metadata:
        config = Path(folder) / "config.json"
        metadata = json.loads(config.read_text()) if config.is_file() else {}
    return {field: metadata[field] for field in ("license", "license_name", "license_link") if metadata.get(field)}
