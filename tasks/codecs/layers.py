"""compressai layers recast for the channels-last tensors the codecs run on (see
`learned._channels_last_input`), and the synthesis of a mosaic's packed region alone.
Imports compressai: import this module lazily."""
from __future__ import annotations

import weakref

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


# synthesis transform -> {(input shape, region, dtype, device, threads): cut path exact?}
_region_verdicts: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, bool]]" = weakref.WeakKeyDictionary()


def synthesis_of_region(g_s: nn.Module, y_hat: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`g_s(y_hat)[..., :height, :width]`, computing only what that region depends on.

    A packed mosaic is padded to the codec's stride (the demo's scale '1': 160 px of 192,
    'pool': 20 of 64) and the decoder's output there is cropped away, yet precoding
    synthesises it m times per scale. For compressai's all-convolutional synthesis
    (transposed convolutions and pointwise GDNs) each layer's input is cut to the rows and
    columns its needed outputs read: the same products per output pixel. Whether the sums
    come out bit for bit as the full synthesis's (the decoder's) is up to the convolution
    kernels, which block some shapes differently (oneDNN here: most, not all), so the first
    call of each shape compares the two on a random latent, and the cut path is taken only
    where it was exact. Any other transform runs in full."""
    layers = list(g_s) if type(g_s) is nn.Sequential else []
    if not layers or not all(isinstance(layer, GDN) or (isinstance(layer, nn.ConvTranspose2d)
                                                        and layer.dilation == (1, 1)) for layer in layers):
        return g_s(y_hat)[..., :height, :width]
    key = (tuple(y_hat.shape), height, width, y_hat.dtype, y_hat.device.type, torch.get_num_threads())
    verdicts = _region_verdicts.setdefault(g_s, {})
    if key not in verdicts:
        # a random latent, not the caller's: one that is mostly zeros (a low quality) could
        # sum alike in any order
        probe = torch.randn(y_hat.shape, generator=torch.Generator().manual_seed(0)).mul_(8).round_()
        probe = probe.to(y_hat)
        part = _cut_synthesis(layers, probe, height, width)
        verdicts[key] = part is not None and torch.equal(part, g_s(probe)[..., :height, :width])
    if not verdicts[key]:
        return g_s(y_hat)[..., :height, :width]
    return _cut_synthesis(layers, y_hat, height, width)


def _cut_synthesis(layers: list[nn.Module], y_hat: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
    """The layers on inputs cut to what output region (height, width) reads; None where a
    layer's output falls short of it."""
    cuts, h, w = [], height, width  # per transposed convolution, the input it needs
    for layer in reversed(layers):
        if isinstance(layer, nn.ConvTranspose2d):
            h, w = _rows_needed(layer, 0, h), _rows_needed(layer, 1, w)
            cuts.append((h, w))
    x = y_hat.contiguous(memory_format=torch.channels_last)  # as the transform's pre-hook does
    for layer in layers:
        if isinstance(layer, nn.ConvTranspose2d):
            h, w = cuts.pop()
            x = x[..., :h, :w]
        x = layer(x)
    if x.shape[-2] < height or x.shape[-1] < width:
        return None
    return x[..., :height, :width].contiguous()
