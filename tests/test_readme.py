"""Every ```python and ```bash block of README.md runs as written, offline, on the shipped small checkpoints.

Each block runs in its own interpreter or shell, in a fresh folder whose `../shared/data` is the GLUE data, with this
environment's `python` and `hf-moe` first on PATH. Three kinds of block are checked without being run here: the
install commands (what CI runs, `.ci/run`: the test checks they pin what is installed and that CI installs the same),
the quickstart's first try (minutes: `-m slow`), and the commands of an hour or more, whose options are checked
against the commands' own parsers.
"""

import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from hf_moe.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
DATA_DIR = os.environ.get("HF_MOE_DATA_DIR") or str(ROOT.parent / "shared" / "data")
BLOCKS = re.findall(r"^```(python|bash)\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _kind(code: str) -> str:
    if "pip install" in code:
        return "install"
    if "examples/compare_families.py" in code or "examples/run_full_size.py" in code:
        return "long"
    if "hf-moe quickstart" in code and "--train-samples" not in code:
        return "long"
    return "first try" if "hf-moe quickstart" in code else "run"


def _params(kind: str):
    for i, (language, code) in enumerate(BLOCKS):
        if _kind(code) == kind:
            marks = [pytest.mark.slow] if kind == "first try" else []
            yield pytest.param(language, code, id=f"{i}-{language}-{code.splitlines()[0][:40]}", marks=marks)


def test_readme_has_the_blocks_this_file_checks():
    kinds = [_kind(code) for _, code in BLOCKS]
    assert kinds.count("install") == 2  # the README's two commands: install + quickstart, install + tests
    assert kinds.count("first try") == 1 and kinds.count("long") == 2 and kinds.count("run") >= 4


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA_DIR, "glue")), reason=f"no GLUE data at {DATA_DIR}")
@pytest.mark.parametrize("language, code", [*_params("run"), *_params("first try")])
def test_block_runs_as_written(language, code, tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA_DIR)
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")  # blocks run from the repository root
    script = work / ("block.py" if language == "python" else "block.sh")
    script.write_text(code)
    command = [sys.executable, script.name] if language == "python" else ["bash", "-euo", "pipefail", script.name]
    done = subprocess.run(command, cwd=work, env=ENV, capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def _commands(code: str) -> list[list[str]]:
    return [shlex.split(part) for line in code.splitlines() for part in line.split("&&") if part.strip()]


@pytest.mark.parametrize("language, code", list(_params("install")))
def test_install_commands_pin_what_is_installed_and_what_ci_installs(language, code):
    for words in _commands(code):
        if words[:2] == ["pip", "install"]:
            for word in words[2:]:
                assert word in CI, f"{word!r} of the README is not what .ci/run installs"
                name, _, pinned = word.partition("==")
                if pinned:
                    assert version(name).split("+")[0] == pinned, f"{name} installed {version(name)}, README {pinned}"
        elif "quickstart" in words:
            build_parser().parse_args(words[words.index("hf-moe") + 1:])
        else:
            assert words == ["HF_HUB_OFFLINE=1", "python", "-m", "pytest"] and "python -m pytest" in CI


@pytest.mark.parametrize("language, code", list(_params("long")))
def test_long_commands_have_only_options_their_commands_know(language, code):
    for words in _commands(code):
        words = [w for w in words if "=" not in w or w.startswith("-")]  # drop VAR=value prefixes
        if words[0] == "hf-moe":
            build_parser().parse_args(words[1:])
        else:
            assert words[0] == "python" and (ROOT / words[1]).is_file()
            usage = subprocess.run([sys.executable, words[1], "--help"], cwd=ROOT, env=ENV, capture_output=True,
                                   text=True, check=True).stdout
            for option in (w for w in words[2:] if w.startswith("--")):
                assert option in usage, f"{words[1]} has no option {option}"
