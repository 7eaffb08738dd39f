"""Shared fixtures of the test suite."""

import pytest
import torch

# Bound on the float32 rounding gap between two computations of the same function whose summation order differs
# (another CPU kernel — AVX2 vs AVX-512 —, another memory layout, another experts backend): each matmul of
# contraction length K rounds within about log2(K)·eps of its magnitude, a transformer layer chains a handful of
# them (attention, FFN, norms), and the gaps of successive layers add up. 64·eps per layer covers K up to 2^16 with
# a factor 4 to spare, and is still 1e4 times below the smallest real defect the tests look for (~1e-3 relative).
FP32_ULPS_PER_LAYER = 64


def fp32_tolerance(reference: torch.Tensor, depth: int = 1) -> float:
    """The largest |Δ| float32 rounding allows on `reference` after `depth` layers (relative to its magnitude)."""
    scale = reference.detach().abs().max().item()
    return FP32_ULPS_PER_LAYER * torch.finfo(torch.float32).eps * depth * scale


def _assert_fp32_close(actual, expected, depth: int = 1, what: str = ""):
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = (actual.double() - expected.double()).abs().max().item()
    bound = fp32_tolerance(expected, depth)
    assert diff <= bound, f"{what}: max |Δ| {diff:.3e} > {bound:.3e} (float32 rounding over {depth} layer(s))"


@pytest.fixture
def assert_fp32_close():
    """`assert_fp32_close(actual, expected, depth=1, what="")`: equal up to float32 rounding over `depth` layers."""
    return _assert_fp32_close
