"""compressai layers recast for the channels-last tensors the codecs run on (see
`learned._channels_last_input`). Imports compressai: import this module lazily."""
from __future__ import annotations

import torch
from compressai.layers import GDN
from torch import nn


class ChannelsLastGDN(GDN):
    """compressai's GDN (and inverse GDN), same parameters and state_dict, with the 1x1
    normalisation convolution done as one matrix product over the pixels, bias included.

    On one thread torch sends a 1x1 convolution to its slow path, which copies a
    channels-last input to NCHW and fills the output with the bias before its product; the
    synthesis runs three of them per call and precoding m x scales calls. Same products
    and sums per pixel (measured bit for bit on the demo VBR's synthesis); an input that is
    not channels-last takes compressai's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.permute(0, 2, 3, 1)  # a plain view when x is channels-last
        if not pixels.is_contiguous():
            return super().forward(x)
        flat = pixels.reshape(-1, x.shape[1])
        beta, gamma_t = self._norm_parameters()
        norm = torch.addmm(beta, flat * flat, gamma_t)
        norm = norm.sqrt_() if self.inverse else norm.rsqrt_()
        # in place without autograd: one allocation fewer of a synthesis-sized tensor, whose
        # fresh pages cost more than the multiply (measured, 160x160x64: 8 -> 6.5 ms)
        out = flat * norm if torch.is_grad_enabled() else norm.mul_(flat)
        return out.view(pixels.shape).permute(0, 3, 1, 2)

    def _norm_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """beta and gamma transposed, after compressai's non-negative reparametrisation. Without
        autograd they are cached until a parameter changes (in place, moved or replaced):
        precoding calls each GDN m x scales times, and the reparametrisation's small ops took
        about a seventh of the layer's time."""
        if torch.is_grad_enabled():
            return self.beta_reparam(self.beta), self.gamma_reparam(self.gamma).t()
        key = (self.beta._version, self.gamma._version, self.beta.data_ptr(), self.gamma.data_ptr())
        cached = getattr(self, "_norm_cache", None)  # not set by __init__: the class is swapped in
        if cached is None or cached[0] != key:
            cached = self._norm_cache = (key, self.beta_reparam(self.beta), self.gamma_reparam(self.gamma).t())
        return cached[1], cached[2]


def use_channels_last_gdn(transform: nn.Module) -> None:
    """Swap the class of every plain GDN in `transform` (weights, keys and hooks stay)."""
    for module in transform.modules():
        if type(module) is GDN:
            module.__class__ = ChannelsLastGDN
