"""Every family on transformers' distributed engine (2 processes, gloo, CPU): over llama (causal LM) the tensor,
expert (+FSDP) and FSDP layouts, over bert (masked LM, which transformers gives no tensor-parallel plan) the expert
and FSDP layouts, give the single-process logits on a padded batch and the single-process weights after one SGD step
on the same global batch, aux loss included; and each layout shards what it says (docs/backbones.md §5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_data import LR, global_batch, padded_batch
from models_common import HIDE_HF_MOE
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, LlamaConfig
from transformers.distributed import DistributedConfig

from hf_moe.modeling import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "tp": {"tp_size": 2},
    "ep+fsdp": {"ep_size": 2, "fsdp_size": 2},
    "fsdp": {"fsdp_size": 2},
}
PORTS = {"tp": 29531, "ep+fsdp": 29532, "fsdp": 29533}
TEXT_CONFIGS = {
    "llama": LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
    "bert": BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
HEADS = {"llama": AutoModelForCausalLM, "bert": AutoModelForMaskedLM}
CASES = [(model_type, backbone) for backbone in TEXT_CONFIGS for model_type in REGISTRY]


def _layouts(backbone: str) -> list[str]:
    return [layout for layout in LAYOUTS if backbone == "llama" or "tp" not in layout]


RUNS = [pytest.param(t, b, layout, id=f"{t}-{b}-{layout}") for t, b in CASES for layout in _layouts(b)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """(model type, backbone) -> (saved folder, logits on the padded batch, weights after one SGD step, aux loss of
    that step, the largest change of any weight in that step)."""
    root = tmp_path_factory.mktemp("families")
    references = {}
    for model_type, backbone in CASES:
        torch.manual_seed(1)
        config = AutoConfig.for_model(model_type, text_config=TEXT_CONFIGS[backbone], num_experts=4,
                                      num_experts_per_tok=2)
        model = HEADS[backbone].from_config(config).eval()
        folder = root / f"{model_type}-{backbone}"
        model.save_pretrained(folder)
        with torch.no_grad():
            logits = model(**padded_batch()).logits
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        model.train()
        input_ids = global_batch()
        output = model(input_ids=input_ids, labels=input_ids)
        output.loss.backward()
        torch.optim.SGD(model.parameters(), lr=LR).step()
        weights = {name: param.detach().clone() for name, param in model.named_parameters()}
        largest_update = max((weights[name] - before[name]).abs().max().item() for name in weights)
        references[model_type, backbone] = (str(folder), logits, weights, output.aux_loss.item(), largest_update)
    return references


@pytest.fixture(scope="module")
def distributed(single_process, tmp_path_factory):
    """layout -> [rank 0 results, rank 1 results], each folder -> what the worker wrote."""
    results = {}
    for layout, sizes in LAYOUTS.items():
        folders = ",".join(single_process[case][0] for case in CASES if layout in _layouts(case[1]))
        output = tmp_path_factory.mktemp(layout.replace("+", "_")) / "result"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(PORTS[layout]), str(ROOT / "tests" / "distributed_worker.py"), folders, json.dumps(sizes),
                   str(output)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{layout}: {done.stderr[-4000:]}"
        results[layout] = [json.loads(Path(f"{output}.rank{rank}").read_text()) for rank in (0, 1)]
        results[layout].append(Path(f"{output}.saved"))
    return results


def _relative_gap(got, want, mask=None) -> float:
    got, want = torch.tensor(got, dtype=want.dtype), want
    if mask is not None:
        got, want = got[mask], want[mask]
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("model_type, backbone, layout", RUNS)
def test_logits_equal_the_single_process_logits(model_type, backbone, layout, single_process, distributed):
    folder, want, *_ = single_process[model_type, backbone]
    real = padded_batch()["attention_mask"].bool()
    for rank, results in enumerate(distributed[layout][:2]):
        gap = _relative_gap(results[folder]["logits"], want, real)
        assert gap <= 1e-5, f"rank {rank}: relative gap {gap:.2e}"


@pytest.mark.parametrize("model_type, backbone, layout", RUNS)
def test_one_step_gives_the_single_process_weights(model_type, backbone, layout, single_process, distributed):
    """One SGD step on the global batch (split over the data-parallel ranks): the same weights, the aux loss taken
    over the global batch. Each weight is compared relative to its own magnitude or to the step's largest update,
    whichever is larger: a weight whose true gradient is 0 (BERT's key bias) moves only by rounding."""
    folder, _, weights, aux_loss, largest_update = single_process[model_type, backbone]
    for rank, results in enumerate(distributed[layout][:2]):
        result = results[folder]
        assert abs(result["aux_loss"] - aux_loss) <= 1e-5 * abs(aux_loss), (rank, result["aux_loss"], aux_loss)
        for name, want in weights.items():
            gap = (torch.tensor(result["weights"][name], dtype=want.dtype) - want).abs().max().item()
            scale = max(want.abs().max().item(), largest_update)
            assert gap <= 1e-5 * scale, f"rank {rank} {name}: gap {gap:.2e}, scale {scale:.2e}"


def test_each_layout_shards_what_it_says(single_process, distributed):
    """TP: half of each attention projection's rows and of each expert's inner dimension per rank; EP: half the
    experts per rank; FSDP: half of every weight. No layout leaves the expert weights whole on a rank."""
    folder = single_process["topk_moe", "llama"][0]
    whole = {name: list(w.shape) for name, w in single_process["topk_moe", "llama"][2].items()}
    tp, ep, fsdp = (distributed[layout][0][folder]["shapes"] for layout in ("tp", "ep+fsdp", "fsdp"))
    for name, shape in whole.items():
        if name.endswith("self_attn.q_proj.weight"):
            assert tp[name] == [shape[0] // 2, shape[1]], name
        if name.endswith("experts.gate_up_proj"):
            assert tp[name] == [shape[0], shape[1] // 2, shape[2]], name
        if name.endswith("experts.down_proj"):
            assert tp[name] == [shape[0], shape[1], shape[2] // 2], name
        if ".experts." in name:
            assert ep[name] == [shape[0] // 2, *shape[1:]], name
            assert fsdp[name] == [shape[0] // 2, *shape[1:]], name


@pytest.mark.parametrize("model_type, backbone, layout", RUNS)
def test_a_checkpoint_saved_by_a_sharded_model_loads_in_one_process(model_type, backbone, layout, single_process,
                                                                    distributed):
    """`save_pretrained` from 2 ranks writes the full checkpoint once: one process loads it, with its card and its
    modeling code, and holds exactly the weights the sharded model was loaded from."""
    folder = Path(single_process[model_type, backbone][0])
    saved = distributed[layout][2] / folder.name
    assert (saved / "README.md").exists() and (saved / "modeling_families.py").exists()  # remote code carried
    head = HEADS[backbone]
    assert json.loads((saved / "config.json").read_text())["auto_map"][head.__name__]
    loaded, info = head.from_pretrained(saved, output_loading_info=True)
    assert not any(info.values()), info
    original = head.from_pretrained(folder).state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


REMOTE_CHILD = HIDE_HF_MOE + """
import json

import torch
import transformers

from distributed_data import padded_batch

logits = {}
for folder, head in json.loads(sys.argv[2]).items():
    model = getattr(transformers, head).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits[folder] = model(**padded_batch()).logits.tolist()
assert not any(name == "hf_moe" or name.startswith("hf_moe.") for name in sys.modules)
print(json.dumps(logits))
"""


def test_checkpoints_saved_under_fsdp_load_as_remote_code_without_hf_moe(single_process, distributed, tmp_path):
    """FSDP2 swaps a model's class for a subclass of its own: the checkpoint still carries hf-moe's modeling code and
    names its classes in `auto_map`, so a process without hf_moe loads it (`trust_remote_code`) with the same logits."""
    saved = {str(distributed["fsdp"][2] / Path(folder).name): HEADS[backbone].__name__
             for (model_type, backbone), (folder, *_) in single_process.items()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-c", REMOTE_CHILD, str(ROOT), json.dumps(saved)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    logits = json.loads(done.stdout.strip().splitlines()[-1])
    real = padded_batch()["attention_mask"].bool()
    for case, (folder, want, *_) in single_process.items():
        gap = _relative_gap(logits[str(distributed["fsdp"][2] / Path(folder).name)], want, real)
        assert gap <= 1e-5, f"{case}: relative gap {gap:.2e}"


@pytest.mark.parametrize("backbone", ["mistral", "qwen2", "qwen3"])
def test_the_other_llama_like_backbones_get_attention_and_expert_rules(backbone):
    """The backbones whose transformers model has a tensor-parallel plan get it under the backbone's path, with the
    experts' rules, and every rule names parameters of the model (as tests/test_conformance.py checks generally)."""
    text_config = AutoConfig.for_model(backbone, vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("topk_moe", text_config=text_config, num_experts=4))
    experts = "model.layers.*.mlp.moe.experts"
    assert model.tp_plan["model.layers.*.self_attn.q_proj"] == "colwise"
    assert model.tp_plan[f"{experts}.gate_up_proj"] == "packed_colwise"
    assert model.tp_plan[f"{experts}.down_proj"] == "rowwise" and model.tp_plan[experts] == "moe_tp_experts"
    assert model.ep_plan[f"{experts}.gate_up_proj"] == "grouped_gemm"
    assert model.ep_plan[experts] == "ep_dispatch_experts"
    assert not any(".mlp.gate_proj" in rule or ".mlp.up_proj" in rule for rule in model.tp_plan)


def test_tensor_parallelism_over_a_backbone_without_a_plan_names_the_backbone():
    text_config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=64)
    model = AutoModel.from_config(AutoConfig.for_model("topk_moe", text_config=text_config))
    with pytest.raises(ValueError, match="transformers has none for bert"):
        model._resolve_parallel_plans(DistributedConfig(tp_size=2))
