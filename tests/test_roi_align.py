"""The compiled channels-last RoIAlign gives torchvision's RoIAlign bit for bit, and falls back
to torchvision's where it cannot be built."""
import logging
import os
import shutil

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from tasks.models import roi_align as kernel

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                    reason="no C++ compiler: the RoIAlign kernel cannot be built here")


def _random_case(g: torch.Generator, trial: int):
    n, c = 3, int(torch.randint(1, 70, (1,), generator=g))
    h, w = (int(v) for v in torch.randint(1, 70, (2,), generator=g))
    x = torch.randn(n, c, h, w, generator=g)
    if trial % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    scale = (0.25, 0.125, 0.0625, 0.03125, 1.0)[trial % 5]
    k = 40
    # corners inside, across and far outside the image; sizes from below one pixel to the image
    corner = torch.rand(k, 2, generator=g) * torch.tensor([w, h]) / scale * 1.4 - 0.2 * torch.tensor([w, h]) / scale
    size = torch.rand(k, 2, generator=g) ** 3 * torch.tensor([w, h]) / scale
    batch = torch.randint(0, n, (k, 1), generator=g).float()
    return x, torch.cat([batch, corner, corner + size], dim=1), scale


@needs_compiler
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_kernel_equals_torchvision_bit_for_bit(aligned, sampling_ratio, monkeypatch):
    monkeypatch.delenv("MFIBA_ROI_ALIGN", raising=False)
    assert kernel.compiled_kernel() is not None, kernel._state.get("reason")
    g = torch.Generator().manual_seed(1 + sampling_ratio + aligned)
    for trial in range(60):
        x, rois, scale = _random_case(g, trial)
        for size in ((7, 7), 14, (5, 3)):
            want = torchvision_roi_align(x, rois, size, scale, sampling_ratio, aligned)
            with torch.no_grad():
                got = kernel.roi_align(x, rois, size, scale, sampling_ratio, aligned)
            assert got.shape == want.shape
            assert torch.equal(got, want), (trial, size, float((got - want).abs().max()))
    # NaN and infinity propagate as in torchvision (zero weights times NaN outside the image)
    x[0, :, 0, 0] = float("nan")
    x[1, :, 2, 1] = float("inf")
    want = torchvision_roi_align(x, rois, 7, scale, sampling_ratio, aligned)
    got = kernel.roi_align(x, rois, 7, scale, sampling_ratio, aligned)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_falls_back_to_torchvision_when_it_cannot_be_built(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'mfiba_roi_align': c++: not found")

    monkeypatch.setattr(kernel, "_state", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    x, rois, scale = _random_case(torch.Generator().manual_seed(0), 0)
    with caplog.at_level(logging.WARNING, logger=kernel.__name__):
        got = kernel.roi_align(x, rois, 7, scale, 2)
        kernel.roi_align(x, rois, 7, scale, 2)
    assert torch.equal(got, torchvision_roi_align(x, rois, 7, scale, 2))
    warnings = [r.getMessage() for r in caplog.records if r.name == kernel.__name__]
    assert len(warnings) == 1 and "c++: not found" in warnings[0] and "torchvision" in warnings[0]


def test_environment_variable_and_autograd_take_torchvision(monkeypatch):
    monkeypatch.setattr(kernel, "_state", {})
    monkeypatch.setenv("MFIBA_ROI_ALIGN", "torchvision")
    assert kernel.compiled_kernel() is None and kernel._state["reason"] == "MFIBA_ROI_ALIGN=torchvision"
    monkeypatch.setattr(kernel, "_state", {"op": lambda *a: pytest.fail("the kernel has no backward")})
    x, rois, scale = _random_case(torch.Generator().manual_seed(0), 0)
    x.requires_grad_(True)
    kernel.roi_align(x, rois, 7, scale, 2).sum().backward()
    assert x.grad is not None
