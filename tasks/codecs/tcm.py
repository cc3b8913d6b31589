"""LIC-TCM (Liu, Sun, Katto, "Learned Image Compression with Mixed Transformer-CNN
Architectures", CVPR 2023) on compressai 1.2.8's building blocks, registered as codec "lic-tcm".

LIC-TCM is not on PyPI and its pretrained weights cannot be downloaded here; this is a
re-implementation from the paper. Architecture (defaults are the paper's: N=128, M=320):

* g_a: ResidualBlockWithStride(3, 2N) -> [TCM blocks x c0 -> ResidualBlockWithStride(2N, 2N)]
  -> [TCM x c1 -> ResidualBlockWithStride] -> [TCM x c2 -> conv3x3(2N, M, stride 2)]  (/16)
* g_s: mirror, with ResidualBlockUpsample and a final subpel_conv3x3(2N, 3, 2).
* TCM block (`ConvTransBlock`) on 2N channels: a 1x1 conv, split into N channels for a CNN
  branch (compressai ResidualBlock, plus a skip) and N for a Swin-Transformer branch (one
  LayerNorm + window MSA + LayerNorm + MLP block); concatenated, fused by a 1x1 conv, added to
  the input. Blocks alternate W-MSA / SW-MSA (shifted windows). `config` gives the number of
  TCM blocks per stage (paper: 2 everywhere), `head_dim` the attention head size per stage.
* h_a: ResidualBlockWithStride(M, 2N) -> TCM x c0 (window 4, head 32) -> conv3x3(2N, 192, /2);
  h_mean_s and h_scale_s: ResidualBlockUpsample(192, 2N) -> TCM x c3 -> subpel_conv3x3(2N, M, 2).
  z (192 channels, /64) goes through compressai's EntropyBottleneck.
* Entropy model for y: Minnen & Singh's channel-wise autoregressive model over `num_slices`
  slices of M / num_slices channels, with latent residual prediction (0.5 * tanh(lrp)); the
  support (hyper mean or scale, plus up to `max_support_slices` decoded slices) first passes
  an SWAtten module (compressai's AttentionBlock whose mask branch starts with a W-MSA +
  SW-MSA pair, between 1x1 convs to/from `atten_dim` channels), then three 3x3 convs with
  GELU (224, 128 hidden channels). GaussianConditional codes y with compressai's rANS.

Window attention (`WindowAttention`) is plain torch: multi-head self-attention inside ws x ws
windows with a learned relative position bias; SW-MSA rolls the map by ws // 2 and masks
pairs that the roll brought together. Maps whose sides are not multiples of the window size
are padded at the bottom/right and padded tokens are never attended to, so every input whose
sides are multiples of 64 works (the authors' code needs larger, 128-aligned inputs).

Parameter names follow the authors' public release (g_a / g_s / h_a / h_mean_s / h_scale_s,
atten_mean, cc_mean_transforms, lrp_transforms, conv1_1 / conv_block / trans_block.msa.
embedding_layer / relative_position_params, ...) so that, with the same hyper-parameters, one
of their checkpoints should load as a plain state_dict (untested: none is available here).

`import compressai` costs seconds, so this module defines the compressai-based classes
(`ConvTransBlock`, `SWAtten`, `TCM`) on first access (module ``__getattr__``); importing the
module to register the codec stays cheap.

Codec factory ``build_lic_tcm(checkpoint=None, N=None, M=None, lmbda=None, seed=0, threads=1,
**tcm_kwargs)`` mirrors `tasks.codecs.learned.build_learned_codec`: random init (one model per
lambda, seeded), a ``mfiba-codec/1`` file (`save_codec` writes it; `load_tcm_codec` reads it),
or plain state_dicts (N, M and z channels read from the shapes; pass ``lmbda=``).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tasks.codecs import learned as _learned
from tasks.codecs.base import register_codec
from tasks.codecs.learned import LearnedCodec

__all__ = [
    "ARCHITECTURE",
    "CODEC_NAME",
    "PAPER_KWARGS",
    "TINY_KWARGS",
    "window_partition",
    "window_reverse",
    "WindowAttention",
    "SwinTransformerBlock",
    "SwinBlock",
    "ConvTransBlock",
    "SWAtten",
    "TCM",
    "tcm_kwargs",
    "load_tcm_codec",
    "build_lic_tcm",
]

ARCHITECTURE = "TCM"  # the class name, which LearnedCodec records as "architecture"
CODEC_NAME = "lic-tcm"

# Every constructor argument, at the paper's values (LIC-TCM with N=128, M=320).
PAPER_KWARGS: dict[str, Any] = {
    "N": 128, "M": 320, "config": [2, 2, 2, 2, 2, 2], "head_dim": [8, 16, 32, 32, 16, 8],
    "window_size": 8, "drop_path_rate": 0.0, "num_slices": 5, "max_support_slices": 5,
    "z_channels": 192, "hyper_head_dim": 32, "hyper_window_size": 4,
    "atten_dim": 128, "atten_head_dim": 16, "cc_hidden": [224, 128],
}
# A small configuration for CPU tests (3.08 M parameters; the default has 76.57 M).
TINY_KWARGS: dict[str, Any] = {
    "N": 32, "M": 40, "config": [1, 1, 1, 1, 1, 1], "head_dim": [8, 8, 8, 8, 8, 8],
    "window_size": 4, "z_channels": 32, "hyper_head_dim": 16, "hyper_window_size": 4,
    "atten_dim": 32, "atten_head_dim": 8, "cc_hidden": [32, 32],
}


# --------------------------------------------------------------------------- window attention
# (plain torch; tensors are channels-last (B, H, W, C) inside the transformer branch)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, ws * ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def _region_labels(n: int, ws: int, shift: int) -> torch.Tensor:
    """Along one axis of the rolled map: 0 for the body, 1 and 2 for the two parts that share
    the last window after the cyclic shift (only they must not attend to each other)."""
    labels = torch.zeros(n, dtype=torch.long)
    if shift:
        labels[n - ws:n - shift] = 1
        labels[n - shift:] = 2
    return labels


@functools.lru_cache(maxsize=64)
def _attention_mask(H: int, W: int, ws: int, shift: int) -> torch.Tensor | None:
    """(nW, ws*ws, ws*ws) bool, True where a query must not see a key (another region of the
    shifted map, or padding); None when nothing is masked. A token always sees itself."""
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    if not shift and (Hp, Wp) == (H, W):
        return None
    labels = _region_labels(Hp, ws, shift)[:, None] * 3 + _region_labels(Wp, ws, shift)[None, :]
    pad = torch.ones(Hp, Wp, dtype=torch.bool)
    pad[:H, :W] = False
    pad = torch.roll(pad, (-shift, -shift), (0, 1))
    labels = window_partition(labels[None, :, :, None], ws)[..., 0]  # (nW, N)
    pad = window_partition(pad[None, :, :, None], ws)[..., 0]
    mask = (labels[:, :, None] != labels[:, None, :]) | pad[:, None, :]
    return mask & ~torch.eye(ws * ws, dtype=torch.bool)


class WindowAttention(nn.Module):
    """Multi-head self-attention within ws x ws windows, with a relative position bias
    (one learned value per head and relative offset). ``shifted=True`` is Swin's SW-MSA."""

    def __init__(self, dim: int, head_dim: int, window_size: int, shifted: bool = False):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of head_dim {head_dim}")
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.scale = head_dim ** -0.5
        self.window_size = window_size
        self.shift = window_size // 2 if shifted else 0
        L = 2 * window_size - 1
        self.embedding_layer = nn.Linear(dim, 3 * dim)  # q, k, v
        self.relative_position_params = nn.Parameter(torch.empty(self.num_heads, L, L))
        nn.init.trunc_normal_(self.relative_position_params, std=0.02)
        self.linear = nn.Linear(dim, dim)  # output projection
        ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
        self.register_buffer("relative_index", coords[:, :, None] - coords[:, None, :] + window_size - 1,
                             persistent=False)  # (2, N, N): offset of query from key, shifted >= 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws, s, heads = self.window_size, self.shift, self.num_heads
        ph, pw = -H % ws, -W % ws
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        if s:
            x = torch.roll(x, (-s, -s), (1, 2))
        windows = window_partition(x, ws)
        n = ws * ws
        q, k, v = self.embedding_layer(windows).view(-1, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # (B * nW, heads, N, N)
        attn = attn + self.relative_position_params[:, self.relative_index[0], self.relative_index[1]]
        mask = _attention_mask(H, W, ws, s)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, heads, n, n).masked_fill(mask.to(attn.device)[None, :, None], float("-inf"))
            attn = attn.view(-1, heads, n, n)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, n, C)
        x = window_reverse(self.linear(out), ws, Hp, Wp)
        if s:
            x = torch.roll(x, (s, s), (1, 2))
        return x[:, :H, :W].contiguous() if (ph or pw) else x


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class SwinTransformerBlock(nn.Module):
    """Pre-norm transformer block, channels-last: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, head_dim: int, window_size: int, drop_path: float = 0.0, shifted: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.msa = WindowAttention(dim, head_dim, window_size, shifted)
        self.drop_path = DropPath(drop_path)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.msa(self.ln1(x)))
        return x + self.drop_path(self.mlp(self.ln2(x)))


class SwinBlock(nn.Module):
    """A W-MSA block then an SW-MSA block, on a (B, C, H, W) map."""

    def __init__(self, dim: int, head_dim: int, window_size: int, drop_path: float = 0.0):
        super().__init__()
        self.block_1 = SwinTransformerBlock(dim, head_dim, window_size, drop_path, shifted=False)
        self.block_2 = SwinTransformerBlock(dim, head_dim, window_size, drop_path, shifted=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_2(self.block_1(x.permute(0, 2, 3, 1)))
        return x.permute(0, 3, 1, 2).contiguous()


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """Rounding with a straight-through gradient."""
    return torch.round(x) - x.detach() + x


# --------------------------------------------------------------------------- compressai-based classes

_LAZY_CLASSES = ("ConvTransBlock", "SWAtten", "TCM")


def __getattr__(name: str):  # PEP 562: define the compressai-based classes on first use
    if name in _LAZY_CLASSES:
        _define_compressai_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_compressai_classes() -> None:
    """Define ConvTransBlock, SWAtten and TCM (they subclass / use compressai, whose import
    is slow) and publish them as attributes of this module."""
    if "TCM" in globals():
        return
    from compressai.ans import BufferedRansEncoder, RansDecoder
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    from compressai.layers import (
        AttentionBlock,
        ResidualBlock,
        ResidualBlockUpsample,
        ResidualBlockWithStride,
        conv1x1,
        conv3x3,
        subpel_conv3x3,
    )
    from compressai.models import CompressionModel
    from compressai.models.utils import conv

    class ConvTransBlock(nn.Module):
        """Transformer-CNN Mixture block on conv_dim + trans_dim channels."""

        def __init__(self, conv_dim: int, trans_dim: int, head_dim: int, window_size: int,
                     drop_path: float = 0.0, shifted: bool = False):
            super().__init__()
            self.conv_dim, self.trans_dim = conv_dim, trans_dim
            self.conv1_1 = conv1x1(conv_dim + trans_dim, conv_dim + trans_dim)  # mix, then split
            self.conv1_2 = conv1x1(conv_dim + trans_dim, conv_dim + trans_dim)  # fuse the branches
            self.conv_block = ResidualBlock(conv_dim, conv_dim)
            self.trans_block = SwinTransformerBlock(trans_dim, head_dim, window_size, drop_path, shifted)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            conv_x, trans_x = torch.split(self.conv1_1(x), (self.conv_dim, self.trans_dim), dim=1)
            conv_x = self.conv_block(conv_x) + conv_x
            trans_x = self.trans_block(trans_x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return x + self.conv1_2(torch.cat((conv_x, trans_x), dim=1))

    class SWAtten(AttentionBlock):
        """Swin-attention module of the entropy parameter networks: in_dim -> 1x1 conv ->
        compressai's attention block (trunk conv_a, mask conv_b) with a W + SW transformer
        pair in front of the mask branch -> 1x1 conv -> out_dim."""

        def __init__(self, in_dim: int, out_dim: int, inter_dim: int, head_dim: int, window_size: int,
                     drop_path: float = 0.0):
            super().__init__(N=inter_dim)
            self.non_local_block = SwinBlock(inter_dim, head_dim, window_size, drop_path)
            self.in_conv = conv1x1(in_dim, inter_dim)
            self.out_conv = conv1x1(inter_dim, out_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.in_conv(x)
            out = self.conv_a(x) * torch.sigmoid(self.conv_b(self.non_local_block(x))) + x
            return self.out_conv(out)

    class TCM(CompressionModel):
        """LIC-TCM. Inputs (B, 3, H, W) with H, W multiples of 64. See the module docstring."""

        def __init__(self, N: int = 128, M: int = 320, config: Sequence[int] = (2, 2, 2, 2, 2, 2),
                     head_dim: Sequence[int] = (8, 16, 32, 32, 16, 8), window_size: int = 8,
                     drop_path_rate: float = 0.0, num_slices: int = 5, max_support_slices: int = 5,
                     z_channels: int = 192, hyper_head_dim: int = 32, hyper_window_size: int = 4,
                     atten_dim: int = 128, atten_head_dim: int = 16, cc_hidden: Sequence[int] = (224, 128)):
            super().__init__()
            if len(config) != 6 or len(head_dim) != 6:
                raise ValueError("config and head_dim take 6 values: g_a stages 1-3, g_s stages 1-3")
            if M % num_slices:
                raise ValueError(f"M={M} is not a multiple of num_slices={num_slices}")
            self.N, self.M, self.num_slices, self.max_support_slices = N, M, num_slices, max_support_slices
            self.window_size = window_size
            n_blocks = sum(config)  # stochastic-depth rate grows linearly over the TCM blocks
            drop = iter([drop_path_rate * i / max(1, n_blocks - 1) for i in range(n_blocks)])

            def stage(count: int, hd: int, ws: int, rates=None) -> list[nn.Module]:
                """n TCM blocks on 2N channels, alternating W-MSA / SW-MSA."""
                return [ConvTransBlock(N, N, hd, ws, next(rates) if rates else 0.0, shifted=bool(i % 2))
                        for i in range(count)]

            c, hd, ws = config, head_dim, window_size
            self.g_a = nn.Sequential(
                ResidualBlockWithStride(3, 2 * N, 2),
                *stage(c[0], hd[0], ws, drop), ResidualBlockWithStride(2 * N, 2 * N, 2),
                *stage(c[1], hd[1], ws, drop), ResidualBlockWithStride(2 * N, 2 * N, 2),
                *stage(c[2], hd[2], ws, drop), conv3x3(2 * N, M, stride=2),
            )
            self.g_s = nn.Sequential(
                ResidualBlockUpsample(M, 2 * N, 2),
                *stage(c[3], hd[3], ws, drop), ResidualBlockUpsample(2 * N, 2 * N, 2),
                *stage(c[4], hd[4], ws, drop), ResidualBlockUpsample(2 * N, 2 * N, 2),
                *stage(c[5], hd[5], ws, drop), subpel_conv3x3(2 * N, 3, 2),
            )
            self.h_a = nn.Sequential(
                ResidualBlockWithStride(M, 2 * N, 2),
                *stage(c[0], hyper_head_dim, hyper_window_size), conv3x3(2 * N, z_channels, stride=2),
            )
            self.h_mean_s = nn.Sequential(
                ResidualBlockUpsample(z_channels, 2 * N, 2),
                *stage(c[3], hyper_head_dim, hyper_window_size), subpel_conv3x3(2 * N, M, 2),
            )
            self.h_scale_s = nn.Sequential(
                ResidualBlockUpsample(z_channels, 2 * N, 2),
                *stage(c[3], hyper_head_dim, hyper_window_size), subpel_conv3x3(2 * N, M, 2),
            )

            S = M // num_slices
            support = [M + S * (i if max_support_slices < 0 else min(i, max_support_slices))
                       for i in range(num_slices)]  # channels of [hyper output, earlier slices]

            def param_net(c_in: int) -> nn.Sequential:
                h1, h2 = cc_hidden
                return nn.Sequential(conv(c_in, h1, stride=1, kernel_size=3), nn.GELU(),
                                     conv(h1, h2, stride=1, kernel_size=3), nn.GELU(),
                                     conv(h2, S, stride=1, kernel_size=3))

            def swatten(c_in: int) -> nn.Sequential:
                return nn.Sequential(SWAtten(c_in, c_in, atten_dim, atten_head_dim, window_size))

            self.atten_mean = nn.ModuleList(swatten(s) for s in support)
            self.atten_scale = nn.ModuleList(swatten(s) for s in support)
            self.cc_mean_transforms = nn.ModuleList(param_net(s) for s in support)
            self.cc_scale_transforms = nn.ModuleList(param_net(s) for s in support)
            self.lrp_transforms = nn.ModuleList(param_net(s + S) for s in support)

            self.entropy_bottleneck = EntropyBottleneck(z_channels)
            self.gaussian_conditional = GaussianConditional(None)

        # -- the channel-wise autoregressive entropy model -----------------------------
        def _slice_params(self, i: int, latent_means, latent_scales, y_hat_slices):
            """Mean and scale of slice i from the hyper outputs and the decoded slices."""
            support = y_hat_slices if self.max_support_slices < 0 else y_hat_slices[:self.max_support_slices]
            mean_support = self.atten_mean[i](torch.cat([latent_means, *support], dim=1))
            mu = self.cc_mean_transforms[i](mean_support)
            scale_support = self.atten_scale[i](torch.cat([latent_scales, *support], dim=1))
            scale = self.cc_scale_transforms[i](scale_support)
            return mu, scale, mean_support

        def _refine(self, i: int, mean_support, y_hat_slice):
            """Latent residual prediction (Minnen & Singh 2020)."""
            lrp = self.lrp_transforms[i](torch.cat([mean_support, y_hat_slice], dim=1))
            return y_hat_slice + 0.5 * torch.tanh(lrp)

        def _hyper(self, z_hat):
            return self.h_mean_s(z_hat), self.h_scale_s(z_hat)

        def forward(self, x: torch.Tensor) -> dict[str, Any]:
            y = self.g_a(x)
            z = self.h_a(y)
            z_hat, z_likelihoods = self.entropy_bottleneck(z)
            if self.training:  # likelihoods from noise, hyper-synthesis on rounded z (STE)
                offset = self.entropy_bottleneck._get_medians()
                z_hat = _ste_round(z - offset) + offset
            latent_means, latent_scales = self._hyper(z_hat)
            y_hat_slices, y_likelihoods = [], []
            for i, y_slice in enumerate(y.chunk(self.num_slices, dim=1)):
                mu, scale, mean_support = self._slice_params(i, latent_means, latent_scales, y_hat_slices)
                _, likelihood = self.gaussian_conditional(y_slice, scale, mu)
                y_likelihoods.append(likelihood)
                rounded = _ste_round(y_slice - mu) if self.training else torch.round(y_slice - mu)
                y_hat_slices.append(self._refine(i, mean_support, rounded + mu))
            x_hat = self.g_s(torch.cat(y_hat_slices, dim=1))
            return {"x_hat": x_hat, "likelihoods": {"y": torch.cat(y_likelihoods, dim=1), "z": z_likelihoods}}

        def _cdf_tables(self):
            gc = self.gaussian_conditional
            return (gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).int().tolist(),
                    gc.offset.reshape(-1).int().tolist())

        def compress(self, x: torch.Tensor) -> dict[str, Any]:
            y = self.g_a(x)
            z = self.h_a(y)
            z_strings = self.entropy_bottleneck.compress(z)
            z_hat = self.entropy_bottleneck.decompress(z_strings, z.size()[-2:])
            latent_means, latent_scales = self._hyper(z_hat)
            gc, B = self.gaussian_conditional, x.shape[0]
            symbols: list[list[int]] = [[] for _ in range(B)]
            indexes: list[list[int]] = [[] for _ in range(B)]
            y_hat_slices = []
            for i, y_slice in enumerate(y.chunk(self.num_slices, dim=1)):
                mu, scale, mean_support = self._slice_params(i, latent_means, latent_scales, y_hat_slices)
                index = gc.build_indexes(scale)
                y_q = gc.quantize(y_slice, "symbols", mu)
                for b in range(B):
                    symbols[b].extend(y_q[b].reshape(-1).tolist())
                    indexes[b].extend(index[b].reshape(-1).tolist())
                y_hat_slices.append(self._refine(i, mean_support, gc.dequantize(y_q, mu)))
            cdf, cdf_lengths, offsets = self._cdf_tables()
            y_strings = []
            for b in range(B):  # one rANS stream per image, slices in order
                encoder = BufferedRansEncoder()
                encoder.encode_with_indexes(symbols[b], indexes[b], cdf, cdf_lengths, offsets)
                y_strings.append(encoder.flush())
            return {"strings": [y_strings, z_strings], "shape": z.size()[-2:]}

        def decompress(self, strings, shape) -> dict[str, torch.Tensor]:
            if len(strings) != 2 or len(strings[0]) != len(strings[1]):
                raise ValueError("strings must be [y_strings, z_strings], one of each per image")
            z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
            latent_means, latent_scales = self._hyper(z_hat)
            B, h, w = z_hat.shape[0], z_hat.shape[2] * 4, z_hat.shape[3] * 4
            gc = self.gaussian_conditional
            cdf, cdf_lengths, offsets = self._cdf_tables()
            decoders = []
            for s in strings[0]:
                decoders.append(RansDecoder())
                decoders[-1].set_stream(s)
            y_hat_slices = []
            for i in range(self.num_slices):
                mu, scale, mean_support = self._slice_params(i, latent_means, latent_scales, y_hat_slices)
                index = gc.build_indexes(scale)
                rv = [dec.decode_stream(index[b].reshape(-1).tolist(), cdf, cdf_lengths, offsets)
                      for b, dec in enumerate(decoders)]
                y_q = torch.tensor(rv, dtype=torch.int32).reshape(B, -1, h, w)
                y_hat_slices.append(self._refine(i, mean_support, gc.dequantize(y_q, mu)))
            x_hat = self.g_s(torch.cat(y_hat_slices, dim=1)).clamp_(0, 1)
            return {"x_hat": x_hat}

    for cls in (ConvTransBlock, SWAtten, TCM):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # picklable as tasks.codecs.tcm.X
        globals()[cls.__name__] = cls


# --------------------------------------------------------------------------- codec


def tcm_kwargs(**overrides) -> dict[str, Any]:
    """All TCM constructor arguments: the paper's defaults with `overrides` (None = default),
    as JSON-able plain ints / floats / lists (LearnedCodec hashes and saves them)."""
    unknown = set(overrides) - set(PAPER_KWARGS)
    if unknown:
        raise ValueError(f"unknown TCM arguments {sorted(unknown)}; known: {sorted(PAPER_KWARGS)}")
    out = dict(PAPER_KWARGS)
    out.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in out.items():
        if isinstance(value, (list, tuple)):
            out[key] = [int(v) for v in value]
        else:
            out[key] = float(value) if key == "drop_path_rate" else int(value)
    return out


def _new_tcm(kwargs: Mapping[str, Any], seed: int | None) -> nn.Module:
    _define_compressai_classes()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return globals()["TCM"](**kwargs)


def _infer_kwargs(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """N, M and the z channels of a TCM state_dict."""
    try:
        return {"N": int(state["g_a.0.conv1.weight"].shape[0]) // 2,
                "M": int(state["h_a.0.conv1.weight"].shape[1]),
                "z_channels": int(state["h_mean_s.0.subpel_conv.0.weight"].shape[1])}
    except KeyError as e:
        raise ValueError(f"checkpoint lacks {e.args[0]!r}: not a TCM state_dict") from None


def load_tcm_codec(path: str | os.PathLike, *, threads: int | None = 1, check_tables: bool = True) -> LearnedCodec:
    """`tasks.codecs.learned.load_codec` for files of this architecture (load_codec rebuilds
    models from compressai.models only). The stored CDF tables are used as they are."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != _learned.FORMAT:
        raise ValueError(f"{path}: not a {_learned.FORMAT} codec file")
    if data["architecture"] != ARCHITECTURE:
        raise ValueError(f"{path} holds a {data['architecture']}, not a {ARCHITECTURE}: use learned.load_codec")
    kwargs = dict(data["kwargs"])
    models, lambdas = [], []
    for i, rp in enumerate(data["rate_points"]):
        model = _new_tcm(kwargs, seed=None)
        model.load_state_dict(rp["state_dict"])
        if check_tables:
            _learned._check_tables(model, f"{path} rate point {i}")
        models.append(model)
        lambdas.append(rp["lambda"])
    codec = LearnedCodec(models, lambdas, name=data["codec"], architecture=ARCHITECTURE, kwargs=kwargs,
                         source=data.get("source", str(path)), threads=threads, update=False)
    if codec.checkpoint_sha256.hex() != data.get("checkpoint_sha256"):
        raise ValueError(f"{path}: weights hash {codec.checkpoint_sha256.hex()[:12]} differs from the recorded "
                         f"{str(data.get('checkpoint_sha256'))[:12]}: the file is corrupt or was edited")
    return codec


def _is_codec_file(path) -> bool:
    try:
        head = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(head, dict) and head.get("format") == _learned.FORMAT


@register_codec(CODEC_NAME)
def build_lic_tcm(checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None, N: int | None = None,
                  M: int | None = None, lmbda: float | Sequence[float] | None = None, seed: int = 0,
                  threads: int | None = 1, **tcm_args) -> LearnedCodec:
    """LIC-TCM as codec "lic-tcm" (a fixed-rate family, one model per lambda); see the module docstring."""
    lams = None if lmbda is None else ([float(lmbda)] if isinstance(lmbda, (int, float)) else [float(x) for x in lmbda])
    user = {"N": N, "M": M, **tcm_args}
    if checkpoint is None:
        kwargs = tcm_kwargs(**user)
        lams = lams or [_learned.DEFAULT_LAMBDA]
        models = [_new_tcm(kwargs, seed + i) for i in range(len(lams))]
        return LearnedCodec(models, lams, name=CODEC_NAME, architecture=ARCHITECTURE, kwargs=kwargs,
                            source=f"random-init (seed {seed})", threads=threads)

    paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    if len(paths) == 1 and _is_codec_file(paths[0]):
        codec = load_tcm_codec(paths[0], threads=threads)
        if codec.name != CODEC_NAME:
            raise ValueError(f"{paths[0]} holds codec {codec.name!r}, not {CODEC_NAME!r}")
        for key, value in user.items():
            if value is not None and tcm_kwargs(**{key: value})[key] != codec.kwargs[key]:
                raise ValueError(f"{paths[0]}: {key}={value} given, the file has {codec.kwargs[key]}")
        return codec
    if lams is None or len(lams) != len(paths):
        raise ValueError(f"{CODEC_NAME}: plain checkpoints carry no lambda; pass lmbda= with one training "
                         f"lambda per checkpoint ({len(paths)} given)")
    models, sources, kwargs = [], [], None
    for p in paths:
        state, file_sha = _learned._read_plain_state_dict(p)
        inferred = _infer_kwargs(state)
        for key, value in inferred.items():
            if user.get(key) is not None and user[key] != value:
                raise ValueError(f"{p}: {key}={user[key]} given, but the checkpoint has {key}={value}")
        kw = tcm_kwargs(**{**user, **inferred})
        if kwargs is not None and kw != kwargs:
            raise ValueError(f"{p}: shapes {kw} differ from the first checkpoint's {kwargs}")
        kwargs = kw
        model = _new_tcm(kw, seed=None)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{p}: does not fit TCM({kw}): {e}") from None
        models.append(model)
        sources.append(f"{p} (file sha256 {file_sha[:12]})")
    return LearnedCodec(models, lams, name=CODEC_NAME, architecture=ARCHITECTURE, kwargs=kwargs,
                        source="; ".join(sources), threads=threads)
