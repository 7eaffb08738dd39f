"""The family registry: every family is one record next to its layer plus one registry line, and nothing else in
the package switches on family names. A toy sixth family is added to a copy of the package exactly as docs/README.md
says ("Adding a family"), and works end to end through the Auto classes, upcycling, PEFT and the command line."""

import difflib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_moe.modeling import REGISTRY, all_families, get_adapter, get_family

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

TOY_FAMILY = '''"""Uniform top-k: the k most probable experts, each weighted 1/k (a toy family for
tests/test_registry.py)."""

import torch
from huggingface_hub.dataclasses import strict

from .configuration_hf_moe import MoeConfig
from .topk_moe import Router, TopKMoeLayer
from .registry import MoeFamily


@strict
class UniformMoeConfig(MoeConfig):
    model_type = "uniform_moe"


class UniformMoeLayer(TopKMoeLayer):
    def select(self, probs):
        index = probs.topk(self.config.num_experts_per_tok, dim=-1).indices  # [T, k]
        return index, torch.full(index.shape, 1 / index.shape[-1], dtype=probs.dtype, device=probs.device)


FAMILY = MoeFamily(
    config_class=UniformMoeConfig,
    layer_class=UniformMoeLayer,
    init_modules=(Router,),
    peft_modules_to_save=("router",),
)
'''
REGISTRY_LINE = '    "uniform_moe": ("UniformMoe", ".uniform_moe"),\n'

# run in the copy: the toy family through the Auto classes, save/load, upcycling (function-preserving: the weights
# sum to 1), LoRA and the command line's family choices
TOY_CHECKS = """
import torch
import hf_moe
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from hf_moe.cli import build_parser
from hf_moe.training.peft import apply_lora

assert "uniform_moe" in hf_moe.FAMILY_NAMES and hf_moe.get_family("uniform_moe").class_prefix == "UniformMoe"
dense_config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2)
torch.manual_seed(0)
dense = LlamaForCausalLM(dense_config).eval()
config = AutoConfig.for_model("uniform_moe", text_config=dense_config, num_experts=4, num_experts_per_tok=2)
model = AutoModelForCausalLM.from_config(config)
assert type(model) is hf_moe.UniformMoeForCausalLM, type(model)
ids = torch.randint(0, 64, (2, 7))
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
assert torch.isfinite(loss) and model.model.layers[0].mlp.moe.router.weight.grad.abs().sum() > 0
model.save_pretrained("saved")
reloaded = AutoModelForCausalLM.from_pretrained("saved").eval()
assert torch.equal(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
upcycled = hf_moe.upcycle_model(dense, "uniform_moe", num_experts=4, num_experts_per_tok=2).eval()
with torch.no_grad():
    gap = (upcycled(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max().item()
assert gap < 1e-5, gap
lora = apply_lora(model, r=2)
assert any("lora_A" in name for name, _ in lora.named_parameters())
upcycle_parser = next(a for a in build_parser()._actions if a.dest == "command").choices["upcycle"]
assert "uniform_moe" in next(a for a in upcycle_parser._actions if a.dest == "family").choices
print("TOY FAMILY OK")
"""


def _changed_files(before: Path, after: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (lines added, lines removed) between two trees of .py files."""
    changes = {}
    names = {p.relative_to(before) for p in before.rglob("*.py")} | {p.relative_to(after) for p in after.rglob("*.py")}
    for name in sorted(names):
        old = (before / name).read_text().splitlines() if (before / name).exists() else []
        new = (after / name).read_text().splitlines() if (after / name).exists() else []
        diff = list(difflib.unified_diff(old, new, lineterm="", n=0))
        added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
        removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
        if added or removed:
            changes[str(name)] = (added, removed)
    return changes


def test_a_sixth_family_is_one_file_plus_one_registry_line(tmp_path):
    before, copy = tmp_path / "before", tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("hf_moe", "utils"):
        shutil.copytree(ROOT / folder, before / folder, ignore=ignore)
        shutil.copytree(before / folder, copy / folder)
    modeling = copy / "hf_moe" / "modeling"
    (modeling / "uniform_moe.py").write_text(TOY_FAMILY)
    registry = (modeling / "registry.py").read_text()
    last_line = '    "dynamic_moe": ("DynamicMoe", ".dynamic_moe"),\n'
    (modeling / "registry.py").write_text(registry.replace(last_line, last_line + REGISTRY_LINE))

    env = {**ENV, "PYTHONPATH": str(copy)}
    generate = subprocess.run([sys.executable, "utils/generate_model_classes.py"], cwd=copy, env=env, text=True,
                              capture_output=True, timeout=300)
    assert generate.returncode == 0, generate.stderr[-2000:]
    changes = _changed_files(before / "hf_moe", copy / "hf_moe")
    print("diffstat of adding the toy family:", changes)
    assert changes.keys() == {"modeling/uniform_moe.py", "modeling/registry.py", "modeling/modeling_families.py"}
    assert changes["modeling/registry.py"] == (1, 0)  # by hand: the new file and this line; the rest is generated

    checks = subprocess.run([sys.executable, "-c", TOY_CHECKS], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=600)
    assert checks.returncode == 0 and "TOY FAMILY OK" in checks.stdout, checks.stderr[-3000:]


def test_no_switch_on_family_names_outside_the_registry():
    pattern = re.compile(r"""(model_type|family)\s*(==|!=|in)\s*\(?["']""")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in (ROOT / "hf_moe").rglob("*.py")
        if path.name != "registry.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_every_record_is_registered_under_its_model_type_and_prefix():
    families = all_families()
    assert list(families) == list(REGISTRY)
    for model_type, family in families.items():
        assert family.model_type == model_type
        assert family.class_prefix == REGISTRY[model_type][0]
        assert family.layer_class.__module__.endswith(REGISTRY[model_type][1])


def test_unknown_family_error_lists_the_families():
    with pytest.raises(ValueError, match="Unknown family 'switch'; hf-moe families are topk_moe, hypermoe"):
        get_family("switch")


def test_backbone_adapters_name_attention_modules_that_exist():
    """PEFT targets come from the backbone adapter: each names modules of its transformers model."""
    from models_common import BACKBONES, text_config
    from transformers import AutoConfig, AutoModel

    for model_type in BACKBONES:
        model = AutoModel.from_config(AutoConfig.for_model(**text_config(model_type)))
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        assert set(get_adapter(model_type).attention_modules) <= leaf_names, model_type
