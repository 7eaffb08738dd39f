"""Remote code: a saved checkpoint carries its modeling files and an `auto_map`, and loads with
`trust_remote_code=True` in a fresh interpreter that cannot import hf_moe, giving the in-process outputs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models_common import HIDE_HF_MOE, make_inputs, make_model, model_depth, random_ids

import hf_moe

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = str(Path(hf_moe.__file__).resolve().parent.parent)

# one checkpoint per family, on different backbones and heads
CHECKPOINTS = [
    ("HyperMoe", "llama", "ForCausalLM", "AutoModelForCausalLM"),
    ("MultiHeadMoe", "bert", "ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("DynamicMoe", "t5", "ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("HyperRouter", "gpt2", "ForTokenClassification", "AutoModelForTokenClassification"),
    ("TopKMoe", "qwen3", "ForQuestionAnswering", "AutoModelForQuestionAnswering"),
]

CHILD = textwrap.dedent(
    """
    import json
    import sys
    """
) + HIDE_HF_MOE + textwrap.dedent(
    """

    import torch
    import transformers

    for case in json.load(open("cases.json")):
        auto = getattr(transformers, case["auto"])
        try:
            auto.from_pretrained(case["dir"])
        except ValueError as error:
            assert "trust_remote_code" in str(error), error
        else:
            raise AssertionError("custom code loaded without trust_remote_code")
        data = torch.load(case["inputs"])
        inputs, generate = data["inputs"], data["generate"]
        results = {}
        for impl in ("eager", "grouped_mm"):
            model = auto.from_pretrained(case["dir"], trust_remote_code=True, experts_implementation=impl).eval()
            cls = type(model)
            assert cls.__name__ == case["cls"], cls.__name__
            assert cls.__module__.startswith("transformers_modules."), cls.__module__
            assert model.config._experts_implementation == impl
            with torch.no_grad():
                out = model(**inputs)
            results[impl] = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
            if generate is not None:
                with torch.no_grad():
                    results[impl]["generated"] = model.generate(
                        **generate, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
                    )
        torch.save(results, case["out"])
    assert not any(name == "hf_moe" or name.startswith("hf_moe.") for name in sys.modules)
    print("CHILD OK")
    """
)


def test_trust_remote_code_in_a_process_without_hf_moe(tmp_path, assert_fp32_close):
    cases, expected, depth = [], {}, {}
    for family, backbone, head, auto in CHECKPOINTS:
        name = f"{family}-{backbone}-{head}"
        model = make_model(family, backbone, head).eval()
        depth[name] = model_depth(model)
        directory = tmp_path / name
        model.save_pretrained(directory)
        saved = json.loads((directory / "config.json").read_text())
        assert saved["auto_map"][auto].endswith(f".{family}{head}"), saved["auto_map"]
        assert "AutoConfig" in saved["auto_map"]
        for module_file in saved["auto_map"].values():
            assert (directory / (module_file.split(".")[0] + ".py")).is_file()

        inputs = make_inputs(backbone, head, seed=4)
        generate = None
        with torch.no_grad():
            out = model(**inputs)
            expected[name] = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
            if head in ("ForCausalLM", "ForConditionalGeneration"):
                generate = {"input_ids": random_ids((2, 4), seed=9)}
                expected[name]["generated"] = model.generate(
                    **generate, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
                )
        cases.append(
            {
                "dir": str(directory),
                "auto": auto,
                "cls": f"{family}{head}",
                "inputs": str(directory / "inputs.pt"),
                "out": str(directory / "remote.pt"),
            }
        )
        torch.save({"inputs": inputs, "generate": generate}, directory / "inputs.pt")

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, REPO],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "CHILD OK" in result.stdout

    for case, (family, backbone, head, _) in zip(cases, CHECKPOINTS):
        name = f"{family}-{backbone}-{head}"
        remote = torch.load(case["out"])
        for impl in ("eager", "grouped_mm"):
            assert remote[impl].keys() == expected[name].keys(), (name, impl)
            for key, value in expected[name].items():
                if key == "generated":
                    assert torch.equal(remote[impl][key], value), (name, impl)
                else:
                    # eager: same code and weights; grouped_mm: another kernel — float32 rounding either way
                    assert_fp32_close(remote[impl][key], value, depth[name], f"{name} {impl} {key}")
