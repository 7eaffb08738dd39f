"""Shared fixtures of the test suite: float32 comparison bounds and the tiny checkpoints the conversion tests build."""

from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

# Bound on the float32 rounding gap between two computations of the same function whose summation order differs
# (another CPU kernel — AVX2 vs AVX-512 —, another memory layout, another experts backend). A length-n dot product
# rounds by about sqrt(n)·eps relative to its terms (the statistical rule of thumb, Higham, Accuracy and Stability of
# Numerical Algorithms, 2nd ed., §2.8), n being the network's longest reduction; every layer adds such an error, so
# they add up with depth, on the scale of the largest output. Callers that know their longest reduction pass it; the
# default n = 4096 (64·eps per layer) lies above every reduction of the tiny test models, and is still 1e4 times below
# the smallest real defect the tests look for (~1e-3 relative). Measured on MiniLM (n = 1536), AVX-512 and AVX2
# kernels: 5-7·eps per layer, below sqrt(1536) ≈ 39.
DEFAULT_REDUCTION = 4096


def fp32_tolerance(reference: torch.Tensor, depth: int = 1, reduction: int = DEFAULT_REDUCTION) -> float:
    """The largest |Δ| float32 rounding allows on `reference` after `depth` layers whose longest reduction is
    `reduction` terms long (relative to the reference's magnitude)."""
    scale = torch.as_tensor(reference).detach().abs().max().item()
    return reduction**0.5 * torch.finfo(torch.float32).eps * depth * scale


def _assert_fp32_close(actual, expected, depth: int = 1, what: str = "", reduction: int = DEFAULT_REDUCTION):
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = (actual.double() - expected.double()).abs().max().item()
    bound = fp32_tolerance(expected, depth, reduction)
    assert diff <= bound, (f"{what}: max |Δ| {diff:.3e} > {bound:.3e} (float32 rounding over {depth} layer(s), "
                           f"reductions of {reduction})")


@pytest.fixture
def single_thread():
    """One intra-op thread: tiny models run fastest so, and spinning worker threads make a loaded 2-core machine
    crawl (a 0.3 s generation test took 20 s). Model test modules use it for all their tests (`pytestmark`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def assert_fp32_close():
    """`assert_fp32_close(actual, expected, depth=1, what="", reduction=4096)`: equal up to float32 rounding over
    `depth` layers whose longest reduction has `reduction` terms."""
    return _assert_fp32_close


# ---------------------------------------------------------------------------------------------------------------
# tiny checkpoints for the conversion tests


def _save_llama(folder: Path, hidden: int = 32, layers: int = 2, tie: bool = True, **save_kwargs) -> Path:
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, **save_kwargs)
    return folder


def _save_mixtral(folder: Path, hidden: int = 32, layers: int = 2, **save_kwargs) -> Path:
    config = MixtralConfig(vocab_size=96, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(folder, **save_kwargs)  # per-expert w1/w2/w3, as on the Hub
    return folder


@pytest.fixture
def llama_checkpoint():
    """`llama_checkpoint(folder, hidden=32, layers=2, tie=True, **save_pretrained_kwargs)`: saves a tiny seeded
    LlamaForCausalLM (FFN width 2·hidden) into `folder` and returns it."""
    return _save_llama


@pytest.fixture
def mixtral_checkpoint():
    """`mixtral_checkpoint(folder, hidden=32, layers=2, **save_pretrained_kwargs)`: saves a tiny seeded
    MixtralForCausalLM (4 experts of width 48, top-2) into `folder` and returns it."""
    return _save_mixtral


# A conversion run as a script (`python -c SCRIPT SOURCE TARGET SIGNAL`) whose tqdm-like progress object sends its own
# process SIGNAL once the first tensor is written: the conversion is then in the middle of writing its shards (the
# state is printed), a point the test controls rather than races to.
_INTERRUPTED_CONVERSION = """
import os, signal, sys
from pathlib import Path
from hf_moe.conversion import upcycle

signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, even when the tests run in the background

source, target, signal_name = sys.argv[1:]

class SignalAfterFirstTensor:
    def reset(self, total):
        self.total, self.done = total, 0

    def update(self, n):
        self.done += n
        staging = [p for p in Path(target).parent.iterdir() if p.name.startswith(".moe.partial-")]
        shards = [len(list(p.glob("*.safetensors"))) for p in staging]
        print("STATE", self.done < self.total, Path(target).exists(), shards, flush=True)
        os.kill(os.getpid(), getattr(signal, signal_name))

try:
    upcycle(source, target, "topk_moe", progress=SignalAfterFirstTensor(), max_shard_size=4096)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(130)
"""


@pytest.fixture
def interrupted_conversion_script():
    """A script upcycling SOURCE into TARGET (a folder named `moe`) that signals itself with SIGNAL mid-write:
    `python -c SCRIPT SOURCE TARGET SIGNAL`; prints `STATE <bytes left> <target exists> <shards per staging folder>`
    before the signal and `INTERRUPTED` (exit 130) when the conversion raised KeyboardInterrupt."""
    return _INTERRUPTED_CONVERSION
