"""compressai layers recast for the channels-last tensors the codecs run on (see
`learned._channels_last_input`), and a synthesis of only the region of the mosaic read.
Imports compressai: import this module lazily."""
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


def _rows_needed(layer: nn.ConvTranspose2d, dim: int, rows: int) -> int:
    """Input rows (dim 0) or columns (dim 1) that output rows [0, rows) of a transposed
    convolution read: output o sums inputs i with o = i * stride - padding + tap."""
    return (rows - 1 + layer.padding[dim]) // layer.stride[dim] + 1


class RegionSynthesis(nn.Sequential):
    """compressai's all-convolutional synthesis (transposed convolutions and pointwise
    GDNs), same parameters and state_dict, whose output is only the top-left region of the
    mosaic its caller reads (`base.reading_region`; without one, the whole mosaic).

    A packed mosaic is padded to the codec's stride (the demo's scale '1': 160 px of 192,
    'pool': 20 of 64) and the padding is cropped away after decoding; precoding would
    synthesise it m times per scale. Each layer's input is cut to the rows and columns its
    needed outputs read: the same products per output pixel. Whether the sums come out bit
    for bit as the full synthesis's is up to the convolution kernels, which block some
    shapes differently (oneDNN here: most, not all), so the first call of each shape
    compares the two on a random latent, and the cut path is taken only where it was
    exact. Autograd (training) always runs in full."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tasks.codecs.base import mosaic_region

        region = mosaic_region()
        if region is None or torch.is_grad_enabled():
            return super().forward(x)
        height, width = region
        full_height, full_width = self._output_size(*x.shape[-2:])
        if height >= full_height and width >= full_width:
            return super().forward(x)
        key = (tuple(x.shape), height, width, x.dtype, x.device.type, torch.get_num_threads())
        verdicts = self.__dict__.setdefault("_region_verdicts", {})  # not set by __init__: the class is swapped in
        if key not in verdicts:
            # a random latent, not the caller's: one that is mostly zeros (a low quality)
            # could sum alike in any order
            g = torch.Generator().manual_seed(0)
            probe = torch.empty_like(x).copy_(torch.randn(x.shape, generator=g).mul_(8).round_())
            verdicts[key] = torch.equal(self._cut(probe, height, width),
                                        super().forward(probe)[..., :height, :width])
        if not verdicts[key]:
            return super().forward(x)[..., :height, :width]
        return self._cut(x, height, width)

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        for layer in self:
            if isinstance(layer, nn.ConvTranspose2d):
                (s0, s1), (p0, p1), (k0, k1), (o0, o1) = (layer.stride, layer.padding, layer.kernel_size,
                                                          layer.output_padding)
                height, width = (height - 1) * s0 - 2 * p0 + k0 + o0, (width - 1) * s1 - 2 * p1 + k1 + o1
        return height, width

    def _cut(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        cuts, h, w = [], height, width  # per transposed convolution, the input it needs
        for layer in reversed(self):
            if isinstance(layer, nn.ConvTranspose2d):
                h, w = _rows_needed(layer, 0, h), _rows_needed(layer, 1, w)
                cuts.append((h, w))
        for layer in self:
            if isinstance(layer, nn.ConvTranspose2d):
                h, w = cuts.pop()
                x = x[..., :h, :w]
            x = layer(x)
        return x[..., :height, :width]


def use_region_synthesis(transform: nn.Module) -> None:
    """Swap the class of a plain Sequential of transposed convolutions (no dilation) and
    GDNs to `RegionSynthesis` (weights, keys and hooks stay); any other is left as it is."""
    if type(transform) is nn.Sequential and all(
            isinstance(layer, GDN) or (isinstance(layer, nn.ConvTranspose2d) and layer.dilation == (1, 1)
                                       and layer.groups == 1) for layer in transform):
        transform.__class__ = RegionSynthesis
