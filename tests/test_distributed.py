"""Every family on transformers' distributed engine (2 processes, gloo, CPU) over llama: tensor, expert (+FSDP) and
FSDP layouts give the single-process logits on a padded batch and the single-process weights after one SGD step on
the same global batch, aux loss included; and each layout shards what it says (docs/backbones.md §5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_data import LR, global_batch, padded_batch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig
from transformers.distributed import DistributedConfig

from hf_moe.modeling import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "tp": {"tp_size": 2},
    "ep+fsdp": {"ep_size": 2, "fsdp_size": 2},
    "fsdp": {"fsdp_size": 2},
}
PORTS = {"tp": 29531, "ep+fsdp": 29532, "fsdp": 29533}
TEXT_CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """model type -> (saved folder, logits on the padded batch, weights after one SGD step, aux loss of that step)."""
    root = tmp_path_factory.mktemp("families")
    references = {}
    for model_type in REGISTRY:
        torch.manual_seed(1)
        config = AutoConfig.for_model(model_type, text_config=TEXT_CONFIG, num_experts=4, num_experts_per_tok=2)
        model = AutoModelForCausalLM.from_config(config).eval()
        model.save_pretrained(root / model_type)
        with torch.no_grad():
            logits = model(**padded_batch()).logits
        model.train()
        input_ids = global_batch()
        output = model(input_ids=input_ids, labels=input_ids)
        output.loss.backward()
        torch.optim.SGD(model.parameters(), lr=LR).step()
        weights = {name: param.detach().clone() for name, param in model.named_parameters()}
        references[model_type] = (str(root / model_type), logits, weights, output.aux_loss.item())
    return references


@pytest.fixture(scope="module")
def distributed(single_process, tmp_path_factory):
    """layout -> [rank 0 results, rank 1 results], each folder -> what the worker wrote."""
    folders = ",".join(folder for folder, *_ in single_process.values())
    results = {}
    for layout, sizes in LAYOUTS.items():
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


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model_type", list(REGISTRY))
def test_logits_equal_the_single_process_logits(model_type, layout, single_process, distributed):
    folder, want, _, _ = single_process[model_type]
    real = padded_batch()["attention_mask"].bool()
    for rank, results in enumerate(distributed[layout][:2]):
        gap = _relative_gap(results[folder]["logits"], want, real)
        assert gap <= 1e-5, f"rank {rank}: relative gap {gap:.2e}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model_type", list(REGISTRY))
def test_one_step_gives_the_single_process_weights(model_type, layout, single_process, distributed):
    """One SGD step on the global batch (split over the data-parallel ranks): the same weights, the aux loss taken
    over the global batch."""
    folder, _, weights, aux_loss = single_process[model_type]
    for rank, results in enumerate(distributed[layout][:2]):
        result = results[folder]
        assert abs(result["aux_loss"] - aux_loss) <= 1e-5 * abs(aux_loss), (rank, result["aux_loss"], aux_loss)
        for name, want in weights.items():
            gap = _relative_gap(result["weights"][name], want)
            assert gap <= 1e-5, f"rank {rank} {name}: relative gap {gap:.2e}"


def test_each_layout_shards_what_it_says(single_process, distributed):
    """TP: half of each attention projection's rows and of each expert's inner dimension per rank; EP: half the
    experts per rank; FSDP: half of every weight. No layout leaves the expert weights whole on a rank."""
    folder = single_process["topk_moe"][0]
    whole = {name: list(w.shape) for name, w in single_process["topk_moe"][2].items()}
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


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model_type", list(REGISTRY))
def test_a_checkpoint_saved_by_a_sharded_model_loads_in_one_process(model_type, layout, single_process, distributed):
    """`save_pretrained` from 2 ranks writes the full checkpoint once: one process loads it, with its card, and
    holds exactly the weights the sharded model was loaded from."""
    folder = Path(single_process[model_type][0])
    saved = distributed[layout][2] / folder.name
    assert (saved / "README.md").exists()
    loaded, info = AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert not any(info.values()), info
    original = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_tensor_parallelism_over_a_backbone_without_a_plan_names_the_backbone():
    text_config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=64)
    model = AutoModel.from_config(AutoConfig.for_model("topk_moe", text_config=text_config))
    with pytest.raises(ValueError, match="transformers has none for bert"):
        model._resolve_parallel_plans(DistributedConfig(tp_size=2))
