"""Learned feature codecs: compressai models behind the `FeatureCodec` contract.

`LearnedCodec` wraps either a *fixed-rate family* (one compressai model per rate point,
each trained with its own Lagrange multiplier lambda) or one *variable-rate* model
(`MeanScaleHyperpriorVbr`, whose learned gain is a continuous rate knob).

phi, the codec setting the allocator picks per scale, is always a training lambda:

* fixed-rate family: phi must be one of the family's lambdas (matched to 1e-9 relative);
  `phi_range` = (min, max) of them, and anything else is refused with the allowed list;
* variable-rate: phi is continuous in [lambda_0, lambda_7] (the model's `lmbda` list);
  the gain is the piecewise-linear interpolation, in lambda, between the learned gains
  |Gain[s]| at the two neighbouring anchor lambdas, computed with +,-,*,/ in float64 only
  (IEEE-exact, so encoder and decoder derive the same float32 gain from the float64 phi
  stored in the stream) and passed as compressai's ``inputscale`` with ``stage=2``. At an
  anchor lambda the gain is exactly |Gain[s]|, i.e. compressai's own ``s=`` setting.

Registered names (factories ``f(checkpoint=None, N=None, M=None, lmbda=None, seed=0,
threads=1, **arch_kwargs)``; import this module to register them):

=====================  ==========================================  =====================
name                   compressai class                            default N, M
=====================  ==========================================  =====================
bmshj2018-hyperprior   ScaleHyperprior                             128, 192
mbt2018-mean           MeanScaleHyperprior                         128, 192
elic                   Elic2022Official (extra kwarg ``groups``)   192, 320
elic-chandelier        Elic2022Chandelier (``groups``)             192, 320
mean-scale-vbr         MeanScaleHyperpriorVbr (variable rate)      192, 320
=====================  ==========================================  =====================

``checkpoint``: None builds randomly initialised models (seeded; ``describe()`` says
"random-init"), one per ``lmbda`` (default: one rate point at lambda 0.013; for the VBR
model its own eight training lambdas). A path is either a codec file written by
`save_codec` (format ``mfiba-codec/1``), or a plain compressai checkpoint: a ``state_dict``
as ``torch.save(net.state_dict())`` writes it, or compressai's example-trainer checkpoint
(a dict whose ``"state_dict"`` key holds it). ``module.`` prefixes (DataParallel) and the
newer compressai latent-codec key layout (``latent_codec.h_a`` / ``latent_codec.z.``) are
mapped onto 1.2.8's (``latent_codec.hyper.*``); N, M (and ELIC's groups) are read from the
tensor shapes. A plain checkpoint carries no lambda, so give ``lmbda=`` (the lambda it was
trained with; phi then names it). A list of paths with a list of lambdas makes a family.
Public natural-image ELIC checkpoints in compressai's layout load with "elic-chandelier".

Determinism. Decoding needs the encoder's entropy parameters bit for bit, so everything
runs on CPU, under ``torch.use_deterministic_algorithms(True)`` and ``torch.no_grad()``,
with the intra-op thread count pinned (``threads``, default 1: on this machine's CPU,
conv outputs computed with 1 thread and with 2+ threads differ in the last bits, so the
decoded mosaic depends on the decoder's thread count unless it is fixed). The CDF tables
are computed once (``model.update(force=True)``) when a model is built or loaded from a
plain checkpoint, are saved in the codec file and loaded verbatim from it, never
recomputed; `checkpoint_sha256` covers them, so two ends whose tables differ refuse each
other's streams instead of decoding garbage. Float differences in the hyper-synthesis /
context networks between *different* CPUs (instruction sets) can still change an entropy
index (compressai issues 279, 309); verify bit-exactness when encoder and decoder run on
different hardware.

`estimate_bits` gives the rate from an eval-mode forward pass (sum of -log2 likelihoods),
to keep beside the real bytes. `import compressai` takes seconds; it is imported lazily.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from storage.bitstream import BitstreamError
from storage.urls import atomic_torch_save
from tasks.codecs.base import FeatureCodec, MosaicCode, register_codec
from tasks.device import COMPUTE_LOCK

__all__ = [
    "FORMAT",
    "ARCHITECTURES",
    "LearnedCodec",
    "save_codec",
    "load_codec",
    "build_learned_codec",
]

FORMAT = "mfiba-codec/1"
DEFAULT_LAMBDA = 0.0130  # compressai's MSE lambda for quality 4 (of 1..8)
_PHI_REL_TOL = 1e-9

# codec name -> (compressai.models class, default N, default M, variable rate, g_a index of the last conv)
ARCHITECTURES: dict[str, tuple[str, int, int, bool, int]] = {
    "bmshj2018-hyperprior": ("ScaleHyperprior", 128, 192, False, 6),
    "mbt2018-mean": ("MeanScaleHyperprior", 128, 192, False, 6),
    "elic": ("Elic2022Official", 192, 320, False, 13),
    "elic-chandelier": ("Elic2022Chandelier", 192, 320, False, 13),
    "mean-scale-vbr": ("MeanScaleHyperpriorVbr", 192, 320, True, 6),
}
# architecture (class name) -> module defining it, for models outside compressai.models
EXTERNAL_ARCHITECTURES: dict[str, str] = {"TCM": "tasks.codecs.tcm"}


# --------------------------------------------------------------------------- helpers


def _compressai_models():
    import compressai.models  # lazy: ~7 s (it imports torch_geometric)

    return compressai.models


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook on a convolutional analysis or synthesis transform: NHWC input.
    oneDNN's convolutions run faster on it on CPU (measured on the demo's mosaics, one
    thread: VBR synthesis of a 320-px mosaic 67 -> 52 ms; ELIC's analysis and synthesis of
    all scales at 6 qualities 1.28 -> 1.09 s). Precoding runs them m times per scale, so
    this is most of its codec time. The values move by float rounding only (bit for bit for
    the hyperpriors' synthesis here). Not on the hyper and context networks: they give the
    entropy parameters, which encoder and decoder must compute bit for bit alike."""
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def _contiguous_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


@contextlib.contextmanager
def _deterministic(threads: int | None) -> Iterator[None]:
    """CPU, deterministic algorithms, no autograd, a fixed intra-op thread count (process-wide
    torch state: held under COMPUTE_LOCK so that no other thread's computation sees it)."""
    with COMPUTE_LOCK:
        prev_det = torch.are_deterministic_algorithms_enabled()
        prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        prev_threads = torch.get_num_threads()
        prev_fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True)
        # Deterministic mode also NaN-fills every new tensor (a debugging aid against reads
        # of uninitialised memory, which no kernel used here does): about 7% of a VBR
        # precoding's time went to those fills. Results are the same without them.
        torch.utils.deterministic.fill_uninitialized_memory = False
        if threads is not None and threads != prev_threads:
            torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                yield
        finally:
            if threads is not None and torch.get_num_threads() != prev_threads:
                torch.set_num_threads(prev_threads)
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def _entropy_modules(model: nn.Module):
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional

    for name, module in model.named_modules():
        if isinstance(module, (EntropyBottleneck, GaussianConditional)):
            yield name, module


def _tables_ready(model: nn.Module) -> bool:
    return all(m._quantized_cdf.numel() > 0 for _, m in _entropy_modules(model))


def _apply_masks(model: nn.Module) -> None:
    """compressai's MaskedConv2d (ELIC's checkerboard context) multiplies its weight by its
    mask inside every forward, so the stored weights change on first use. Do it once up
    front (idempotent) so the state, and with it the checkpoint hash, is the same before
    and after coding, in the encoder's and the decoder's process."""
    from compressai.layers import MaskedConv2d

    for module in model.modules():
        if isinstance(module, MaskedConv2d):
            module.weight.data = module.weight.data * module.mask


def _layout(model: nn.Module) -> tuple[str, tuple[int, ...]]:
    """How `compress` output maps to (strings, latent_shape): 'hyperprior' (shape is the
    (h, w) of z, strings [y, z]) or 'groups' (ELIC-type: shape {'y': [(c_k, h, w)...],
    'hyper': (h, w)}, strings 2 per channel group then z)."""
    latent_codec = getattr(model, "latent_codec", None)
    if latent_codec is None:
        return "hyperprior", ()
    try:
        groups = latent_codec["y"].groups
    except (KeyError, AttributeError, TypeError):
        raise NotImplementedError(f"{type(model).__name__}: unsupported latent-codec layout") from None
    return "groups", tuple(int(g) for g in groups)


def _arch_kwargs(model: nn.Module, architecture: str) -> dict[str, Any]:
    """Constructor kwargs that rebuild `model`'s shapes."""
    codec_name = _codec_name_of(architecture)
    if codec_name not in ARCHITECTURES:
        raise ValueError(f"cannot read constructor kwargs off a {architecture}; pass kwargs= explicitly")
    N = int(model.g_a[0].weight.shape[0])
    last = ARCHITECTURES[codec_name][4]
    M = int(model.g_a[last].weight.shape[0])
    kwargs: dict[str, Any] = {"N": N, "M": M}
    if hasattr(model, "groups"):
        kwargs["groups"] = [int(g) for g in model.groups]
    return kwargs


def _codec_name_of(architecture: str) -> str:
    for name, spec in ARCHITECTURES.items():
        if spec[0] == architecture:
            return name
    return architecture


def _state_hash(architecture: str, kwargs: Mapping, rate_points: Sequence[tuple[Any, nn.Module]]) -> bytes:
    """SHA-256 over architecture, kwargs, lambdas and every state_dict tensor (sorted keys;
    name, dtype, shape and raw bytes), CDF tables included."""
    h = hashlib.sha256()
    h.update(FORMAT.encode() + b"\0" + architecture.encode() + b"\0")
    h.update(json.dumps(dict(kwargs), sort_keys=True, separators=(",", ":")).encode() + b"\0")
    for lam, model in rate_points:
        lams = lam if isinstance(lam, (list, tuple)) else [lam]
        h.update(struct.pack(f"<I{len(lams)}d", len(lams), *[float(x) for x in lams]))
        state = model.state_dict()
        for key in sorted(state):
            t = state[key].detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def _fmt(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


# --------------------------------------------------------------------------- the codec


class LearnedCodec(FeatureCodec):
    """A compressai model (or a family of them, one per rate point) as a FeatureCodec.

    models: one CompressionModel or a sequence, one per lambda in `lambdas`. A variable-
    rate model (has `Gain` and `lmbda`, e.g. MeanScaleHyperpriorVbr) must come alone;
    its lambdas default to `model.lmbda`. `update=True` computes the CDF tables
    (`model.update(force=True)`); pass False only when the tables were loaded with the
    weights. Models are moved to CPU and put in eval mode; do not change them afterwards
    (`checkpoint_sha256` is computed once, here).
    """

    stride = 64

    def __init__(self, models: nn.Module | Sequence[nn.Module], lambdas: float | Sequence[float] | None = None, *,
                 name: str | None = None, architecture: str | None = None, kwargs: Mapping | None = None,
                 source: str = "in-memory", threads: int | None = 1, update: bool = True):
        models = [models] if isinstance(models, nn.Module) else list(models)
        if not models:
            raise ValueError("LearnedCodec needs at least one model")
        architecture = architecture or type(models[0]).__name__
        if any(type(m).__name__ != architecture for m in models):
            raise ValueError(f"all rate points must be {architecture}, got {[type(m).__name__ for m in models]}")
        self.variable_rate = hasattr(models[0], "Gain") and hasattr(models[0], "lmbda")
        if self.variable_rate:
            if len(models) != 1:
                raise ValueError("a variable-rate codec takes exactly one model")
            if getattr(models[0], "vr_entbttlnck", False):
                raise NotImplementedError("VBR models with a variable-rate entropy bottleneck "
                                          "(vr_entbttlnck=True) are not supported")
            lams = list(models[0].lmbda if lambdas is None else lambdas)
            if len(lams) != len(models[0].Gain):
                raise ValueError(f"{len(lams)} lambdas for {len(models[0].Gain)} gains")
            if any(b <= a for a, b in zip(lams, lams[1:])):
                raise ValueError(f"VBR lambdas must increase, got {lams}")
        else:
            if lambdas is None:
                raise ValueError("a fixed-rate codec needs the training lambda of each model")
            lams = [lambdas] if isinstance(lambdas, (int, float)) else list(lambdas)
            if len(lams) != len(models):
                raise ValueError(f"{len(models)} models but {len(lams)} lambdas")
            if len(set(lams)) != len(lams):
                raise ValueError(f"duplicate lambdas {lams}")
            order = sorted(range(len(lams)), key=lambda i: lams[i])
            models, lams = [models[i] for i in order], [lams[i] for i in order]
        lams = [float(x) for x in lams]
        if not all(math.isfinite(x) and x > 0 for x in lams):
            raise ValueError(f"lambdas must be finite and positive, got {lams}")

        self.models = [m.to("cpu").eval() for m in models]
        if architecture not in EXTERNAL_ARCHITECTURES:  # compressai's all-convolutional g_a, g_s
            from tasks.codecs.layers import use_channels_last_gdn, use_region_synthesis

            for transform in [t for m in self.models for t in (m.g_a, m.g_s)]:
                if not getattr(transform, "_mfiba_channels_last", False):
                    transform.register_forward_pre_hook(_channels_last_input)
                    transform.register_forward_hook(_contiguous_output)
                    use_channels_last_gdn(transform)
                    for layer in transform.modules():
                        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                            # stored as a channels-last input wants them: otherwise torch converts
                            # the weights on every call (precoding: m x scales syntheses), same values
                            layer.weight.data = layer.weight.data.contiguous(memory_format=torch.channels_last)
                    transform._mfiba_channels_last = True
            for m in self.models:
                use_region_synthesis(m.g_s)  # the decoder's output covers only the region read
        self.lambdas = lams
        self.architecture = architecture
        self.name = name or _codec_name_of(architecture)
        self.kwargs = dict(kwargs) if kwargs is not None else _arch_kwargs(self.models[0], architecture)
        self.phi_range = (min(lams), max(lams))
        self.source = source
        self.threads = threads
        self.layout, self.groups = _layout(self.models[0])
        with _deterministic(threads):
            for m in self.models:
                _apply_masks(m)
                if update or not _tables_ready(m):
                    m.update(force=True)
        if self.variable_rate:
            self._gains = [abs(float(g)) for g in self.models[0].Gain.detach()]
        self._sha = _state_hash(architecture, self.kwargs, self._rate_points())

    # -- identity --------------------------------------------------------------------
    def _rate_points(self) -> list[tuple[Any, nn.Module]]:
        if self.variable_rate:
            return [(list(self.lambdas), self.models[0])]
        return list(zip(self.lambdas, self.models))

    @property
    def checkpoint_sha256(self) -> bytes:
        return self._sha

    def describe(self) -> dict[str, Any]:
        return {
            "codec": self.name, "architecture": self.architecture, "kwargs": dict(self.kwargs),
            "variable_rate": self.variable_rate, "lambdas": list(self.lambdas),
            "phi_range": list(self.phi_range), "source": self.source,
            "checkpoint_sha256": self._sha.hex(), "threads": self.threads,
            "parameters": sum(p.numel() for p in self.models[0].parameters()),
        }

    def __repr__(self) -> str:
        return (f"LearnedCodec({self.name!r}, {self.architecture}{self.kwargs}, lambdas=[{_fmt(self.lambdas)}], "
                f"{self.source}, sha256={self._sha.hex()[:12]})")

    # -- phi ---------------------------------------------------------------------------
    def _resolve(self, phi: float, where: str = "") -> tuple[nn.Module, dict[str, Any]]:
        """(model, extra kwargs for compress/decompress/forward) for this phi."""
        prefix = f"codec {self.name!r}: phi={phi}" + (f" for {where}" if where else "")
        phi = float(phi)
        low, high = self.phi_range
        if not math.isfinite(phi) or not (low <= phi <= high):
            allowed = f"; allowed lambdas: {_fmt(self.lambdas)}" if not self.variable_rate else ""
            raise ValueError(f"{prefix} is outside [{low:g}, {high:g}]{allowed}")
        if not self.variable_rate:
            for lam, model in zip(self.lambdas, self.models):
                if math.isclose(phi, lam, rel_tol=_PHI_REL_TOL, abs_tol=0.0):
                    return model, {}
            raise ValueError(f"{prefix} is not one of this fixed-rate family's lambdas: {_fmt(self.lambdas)}")
        return self.models[0], {"stage": 2, "s": 0, "inputscale": torch.tensor(self.gain_for(phi), dtype=torch.float32)}

    def gain_for(self, phi: float) -> float:
        """VBR only: the gain (inverse quantisation step) for phi, exactly float32-representable."""
        if not self.variable_rate:
            raise TypeError(f"codec {self.name!r} is fixed-rate; it has no gain")
        lams, gains = self.lambdas, self._gains
        k = len(lams) - 2
        while k > 0 and phi < lams[k]:
            k -= 1
        t = (phi - lams[k]) / (lams[k + 1] - lams[k])
        g = gains[k] + t * (gains[k + 1] - gains[k])
        return float(torch.tensor(g, dtype=torch.float32))

    def check_phi(self, scale: str, phi: float) -> None:
        self._resolve(phi, f"scale {scale!r}")

    # -- coding ------------------------------------------------------------------------
    def _input(self, mosaic: torch.Tensor) -> torch.Tensor:
        if mosaic.dim() != 3 or mosaic.shape[0] != 3:
            raise ValueError(f"mosaic must be (3, H, W), got {tuple(mosaic.shape)}")
        if mosaic.shape[1] % self.stride or mosaic.shape[2] % self.stride:
            raise ValueError(f"mosaic sides must be multiples of {self.stride}, got {tuple(mosaic.shape[1:])}")
        return mosaic.detach().to("cpu", torch.float32)[None].contiguous()

    def encode_mosaic(self, mosaic: torch.Tensor, phi: float) -> MosaicCode:
        model, extra = self._resolve(phi)
        x = self._input(mosaic)
        with _deterministic(self.threads):
            out = model.compress(x, **extra)
        if any(len(ss) != 1 for ss in out["strings"]):
            raise RuntimeError(f"expected one string per entropy model for batch 1, got {[len(s) for s in out['strings']]}")
        strings = [bytes(ss[0]) for ss in out["strings"]]
        shape = out["shape"]
        if self.layout == "hyperprior":
            latent_shape = tuple(int(v) for v in shape)
        else:
            y_shapes = [tuple(int(v) for v in s) for s in shape["y"]]
            if tuple(s[0] for s in y_shapes) != self.groups or len({s[1:] for s in y_shapes}) != 1:
                raise RuntimeError(f"unexpected ELIC latent shapes {y_shapes} for groups {self.groups}")
            latent_shape = (*(int(v) for v in shape["hyper"]), *y_shapes[0][1:])
        if len(strings) != self._n_strings():
            raise RuntimeError(f"{len(strings)} strings, expected {self._n_strings()}")
        return MosaicCode(strings=strings, latent_shape=latent_shape)

    def _n_strings(self) -> int:
        return 2 if self.layout == "hyperprior" else 2 * len(self.groups) + 1

    def decode_mosaic(self, code: MosaicCode, phi: float) -> torch.Tensor:
        try:
            model, extra = self._resolve(phi)
        except ValueError as e:
            raise BitstreamError(str(e)) from None
        ls = tuple(int(v) for v in code.latent_shape)
        want_dims = 2 if self.layout == "hyperprior" else 4
        if len(ls) != want_dims or min(ls, default=0) < 1:
            raise BitstreamError(f"codec {self.name!r}: latent shape {ls} should be {want_dims} positive ints")
        if len(code.strings) != self._n_strings():
            raise BitstreamError(f"codec {self.name!r}: {len(code.strings)} strings, expected {self._n_strings()}")
        strings = [[bytes(s)] for s in code.strings]
        if self.layout == "hyperprior":
            shape = torch.Size(ls)
        else:
            shape = {"y": [torch.Size((g, ls[2], ls[3])) for g in self.groups], "hyper": torch.Size(ls[:2])}
        with _deterministic(self.threads):
            x_hat = model.decompress(strings, shape, **extra)["x_hat"]
        return x_hat[0]

    # -- estimates ---------------------------------------------------------------------
    def forward_mosaic(self, mosaic: torch.Tensor, phi: float) -> tuple[torch.Tensor, float]:
        """Eval-mode forward: (x_hat clamped to [0, 1] like decode, estimated bits)."""
        model, extra = self._resolve(phi)
        x = self._input(mosaic)
        with _deterministic(self.threads):
            out = model(x, **extra)
        bits = 0.0
        stack = [out["likelihoods"]]
        while stack:
            item = stack.pop()
            if isinstance(item, Mapping):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
            else:
                bits += float(-torch.log2(item.double()).sum())
        return out["x_hat"][0].clamp(0, 1), bits

    def forward_mosaic_multi(self, mosaic: torch.Tensor, phis,
                             bits: bool = True) -> list[tuple[torch.Tensor, float | None]]:
        """`forward_mosaic` at several phis of one mosaic. For compressai's
        MeanScaleHyperpriorVbr the gain acts only where y is quantised: analysis, hyper
        analysis, z and hyper synthesis do not depend on phi and run once; only the
        quantisation and the synthesis run per quality (precoding's m qualities cost one
        analysis instead of m). Same arithmetic as its stage-2 forward (tested).
        `bits=False`: no likelihoods, None for the bits (the other codecs' forward computes
        them anyway and returns them)."""
        phis = [float(p) for p in phis]
        model = self.models[0]
        if not (self.variable_rate and type(model).__name__ == "MeanScaleHyperpriorVbr"
                and not model.vr_entbttlnck and not model.no_quantoffset and len(phis) > 1):
            return [self.forward_mosaic(mosaic, p) for p in phis]
        from compressai.ops import quantize_ste

        extras = [self._resolve(p)[1] for p in phis]
        x = self._input(mosaic)
        with _deterministic(self.threads):
            y = model.g_a(x)
            z = model.h_a(y)
            z_offset = model.entropy_bottleneck._get_medians()
            scales_hat, means_hat = model.h_s(quantize_ste(z - z_offset) + z_offset).chunk(2, 1)
            if bits:
                _, z_likelihoods = model.entropy_bottleneck(z)
                z_bits = float(-torch.log2(z_likelihoods.double()).sum())
            y_hats, y_bits = [], []
            for extra in extras:
                scale = model._get_scale(2, 0, extra["inputscale"])
                rescale = 1.0 / scale.clone().detach()
                y_zm_sc = (y - means_hat) * scale
                signs = torch.sign(y_zm_sc).detach()
                q_abs = quantize_ste(torch.abs(y_zm_sc))
                q_stdev = model.gaussian_conditional.lower_bound_scale(scales_hat * scale)
                stdev_and_gain = torch.cat((q_stdev.unsqueeze(dim=4),
                                            scale.detach().expand(q_stdev.unsqueeze(dim=4).shape)), dim=4)
                q_offsets = (-1) * (model.QuantABCD.forward(stdev_and_gain)).squeeze(dim=4)
                q_offsets[q_abs < 0.0001] = 0
                y_hats.append((signs * (q_abs + q_offsets)) * rescale + means_hat)
                if bits:
                    _, y_likelihoods = model.gaussian_conditional(y * scale, scales_hat * scale,
                                                                  means=means_hat * scale)
                    y_bits.append(float(-torch.log2(y_likelihoods.double()).sum()) + z_bits)
            # One synthesis per quality: stacking them into one batch was slower on CPU
            # (measured: 1.23 s against 8 x 0.11 s for the demo's 8 qualities).
            x_hats = [model.g_s(y_hat)[0] for y_hat in y_hats]
        return [(x_hats[k].clamp(0, 1), y_bits[k] if bits else None) for k in range(len(phis))]

    def estimate_bits(self, mosaic: torch.Tensor, phi: float) -> float:
        """Rate estimate from the likelihoods: sum of -log2 p over all latents."""
        return self.forward_mosaic(mosaic, phi)[1]


# --------------------------------------------------------------------------- files


def save_codec(path: str | os.PathLike, codec: LearnedCodec) -> str:
    """Write the codec (weights and CDF tables, float32 as they are) atomically."""
    data = {
        "format": FORMAT,
        "codec": codec.name,
        "architecture": codec.architecture,
        "kwargs": dict(codec.kwargs),
        "variable_rate": codec.variable_rate,
        "rate_points": [
            {("lambdas" if codec.variable_rate else "lambda"): lam,
             "state_dict": {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}}
            for lam, model in codec._rate_points()
        ],
        "source": codec.source,
        "checkpoint_sha256": codec.checkpoint_sha256.hex(),
    }
    return atomic_torch_save(data, path)


def _new_model(architecture: str, kwargs: Mapping, seed: int | None = 0) -> nn.Module:
    if architecture in EXTERNAL_ARCHITECTURES:
        import importlib

        cls = getattr(importlib.import_module(EXTERNAL_ARCHITECTURES[architecture]), architecture, None)
    else:
        cls = getattr(_compressai_models(), architecture, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"unknown compressai architecture {architecture!r}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return cls(**kwargs)


def _check_tables(model: nn.Module, where: str) -> None:
    """Warn when this machine would compute different CDF tables than the stored ones."""
    import copy

    from compressai.entropy_models import EntropyBottleneck
    from compressai.models.base import get_scale_table

    for name, module in _entropy_modules(model):
        fresh = copy.deepcopy(module)
        if isinstance(module, EntropyBottleneck):
            fresh.update(force=True)
        else:
            fresh.update_scale_table(get_scale_table(), force=True)
        for buf in ("_quantized_cdf", "_offset", "_cdf_length"):
            if not torch.equal(getattr(fresh, buf), getattr(module, buf)):
                warnings.warn(f"{where}: {name}.{buf} recomputed on this machine differs from the stored "
                              "table; the stored one is used (it is what the encoder used)", stacklevel=3)
                return


def load_codec(path: str | os.PathLike, *, threads: int | None = 1, check_tables: bool = True) -> LearnedCodec:
    """Read a `save_codec` file; the stored CDF tables are used as they are."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} codec file (format={data.get('format') if isinstance(data, dict) else None!r})")
    arch, kwargs = data["architecture"], dict(data["kwargs"])
    models, lambdas = [], []
    for i, rp in enumerate(data["rate_points"]):
        model = _new_model(arch, kwargs, seed=None)
        model.load_state_dict(rp["state_dict"])
        if check_tables:
            _check_tables(model, f"{path} rate point {i}")
        models.append(model)
        lambdas.append(rp["lambdas"] if data["variable_rate"] else rp["lambda"])
    codec = LearnedCodec(models, lambdas[0] if data["variable_rate"] else lambdas, name=data["codec"],
                         architecture=arch, kwargs=kwargs, source=data.get("source", str(path)),
                         threads=threads, update=False)
    if codec.checkpoint_sha256.hex() != data.get("checkpoint_sha256"):
        raise ValueError(f"{path}: weights hash {codec.checkpoint_sha256.hex()[:12]} differs from the recorded "
                         f"{str(data.get('checkpoint_sha256'))[:12]}: the file is corrupt or was edited")
    return codec


# --------------------------------------------------------------------------- checkpoints


def _read_plain_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    raw = Path(path).read_bytes()
    file_sha = hashlib.sha256(raw).hexdigest()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a torch checkpoint with weights_only=True ({e}); "
                         "save just the model's state_dict") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (or a dict with a 'state_dict' key) of tensors")
    from compressai.zoo.pretrained import load_pretrained  # 'module.' prefix, legacy key names

    return load_pretrained(dict(obj)), file_sha


def _remap_latent_codec_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Newer compressai (> 1.2.8) layout -> 1.2.8's 'latent_codec.hyper.*'."""
    moves = (("latent_codec.h_a.", "latent_codec.hyper.h_a."), ("latent_codec.h_s.", "latent_codec.hyper.h_s."),
             ("latent_codec.z.entropy_bottleneck.", "latent_codec.hyper.entropy_bottleneck."))
    out = {}
    for k, v in state.items():
        if k not in expected:
            for old, new in moves:
                if k.startswith(old) and new + k[len(old):] in expected:
                    k = new + k[len(old):]
                    break
        out[k] = v
    return out


def _infer_kwargs(codec_name: str, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    _, _, _, _, last = ARCHITECTURES[codec_name]
    try:
        kwargs: dict[str, Any] = {"N": int(state["g_a.0.weight"].shape[0]), "M": int(state[f"g_a.{last}.weight"].shape[0])}
    except KeyError as e:
        raise ValueError(f"checkpoint lacks {e.args[0]!r}: not a compressai {codec_name} state_dict") from None
    if codec_name.startswith("elic"):
        groups, k = [], 0
        while f"latent_codec.y.latent_codec.y{k}.context_prediction.weight" in state:
            groups.append(int(state[f"latent_codec.y.latent_codec.y{k}.context_prediction.weight"].shape[1]))
            k += 1
        if groups:
            kwargs["groups"] = groups
    return kwargs


def _model_from_checkpoint(codec_name: str, path, user_kwargs: Mapping) -> tuple[nn.Module, dict, str]:
    architecture = ARCHITECTURES[codec_name][0]
    state, file_sha = _read_plain_state_dict(path)
    kwargs = _infer_kwargs(codec_name, state)
    for key, value in user_kwargs.items():
        if value is None:
            continue
        if key in kwargs and (list(value) if isinstance(value, (list, tuple)) else value) != kwargs[key]:
            raise ValueError(f"{path}: {key}={value} given, but the checkpoint has {key}={kwargs[key]}")
        kwargs[key] = list(value) if isinstance(value, (list, tuple)) else value
    model = _new_model(architecture, kwargs, seed=None)
    state = _remap_latent_codec_keys(state, set(model.state_dict()))
    state.pop("QuantOffset", None)  # legacy VBR key, as compressai's from_state_dict drops it
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: does not fit compressai {architecture}({kwargs}): {e}") from None
    return model, kwargs, file_sha


def build_learned_codec(codec_name: str, checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                        N: int | None = None, M: int | None = None, lmbda: float | Sequence[float] | None = None,
                        seed: int = 0, threads: int | None = 1, **arch_kwargs) -> LearnedCodec:
    """The factory behind every registered learned codec name (see the module docstring)."""
    if codec_name not in ARCHITECTURES:
        raise ValueError(f"unknown learned codec {codec_name!r}; known: {sorted(ARCHITECTURES)}")
    architecture, default_n, default_m, variable_rate, _ = ARCHITECTURES[codec_name]
    lams = None if lmbda is None else ([float(lmbda)] if isinstance(lmbda, (int, float)) else [float(x) for x in lmbda])

    if checkpoint is None:
        kwargs = {"N": N or default_n, "M": M or default_m, **{k: v for k, v in arch_kwargs.items() if v is not None}}
        if codec_name.startswith("elic") and kwargs.get("groups") is None and kwargs["M"] <= 128:
            raise ValueError(f"{codec_name}: the default channel groups [16, 16, 32, 64, M - 128] need M > 128; "
                             f"pass groups= (summing to M={kwargs['M']}) for smaller models")
        if variable_rate:
            models = [_new_model(architecture, kwargs, seed)]
        else:
            lams = lams or [DEFAULT_LAMBDA]
            models = [_new_model(architecture, kwargs, seed + i) for i in range(len(lams))]
        kwargs = _arch_kwargs(models[0], architecture)
        return LearnedCodec(models, lams, name=codec_name, architecture=architecture, kwargs=kwargs,
                            source=f"random-init (seed {seed})", threads=threads)

    paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    if len(paths) == 1:
        try:
            head = torch.load(paths[0], map_location="cpu", weights_only=True)
        except Exception:
            head = None
        if isinstance(head, dict) and head.get("format") == FORMAT:
            codec = load_codec(paths[0], threads=threads)
            if codec.name != codec_name:
                raise ValueError(f"{paths[0]} holds codec {codec.name!r}, not {codec_name!r}")
            for key, value in (("N", N), ("M", M)):
                if value is not None and codec.kwargs[key] != value:
                    raise ValueError(f"{paths[0]}: {key}={value} given, the file has {codec.kwargs[key]}")
            return codec
    if variable_rate and len(paths) != 1:
        raise ValueError("a variable-rate codec loads from exactly one checkpoint")
    if not variable_rate and (lams is None or len(lams) != len(paths)):
        raise ValueError(f"{codec_name}: plain compressai checkpoints carry no lambda; pass lmbda= with one "
                         f"training lambda per checkpoint ({len(paths)} given)")
    user_kwargs = {"N": N, "M": M, **arch_kwargs}
    models, shas, kwargs = [], [], None
    for p in paths:
        model, kw, sha = _model_from_checkpoint(codec_name, p, user_kwargs)
        if kwargs is not None and kw != kwargs:
            raise ValueError(f"{p}: shapes {kw} differ from the first checkpoint's {kwargs}")
        kwargs = kw
        models.append(model)
        shas.append(sha)
    source = "; ".join(f"{p} (file sha256 {s[:12]})" for p, s in zip(paths, shas))
    return LearnedCodec(models, lams, name=codec_name, architecture=architecture, kwargs=kwargs,
                        source=source, threads=threads)


def _register(codec_name: str) -> None:
    def factory(checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None, N: int | None = None,
                M: int | None = None, **kwargs) -> LearnedCodec:
        return build_learned_codec(codec_name, checkpoint=checkpoint, N=N, M=M, **kwargs)

    factory.__name__ = f"build_{codec_name.replace('-', '_')}"
    factory.__doc__ = f"{ARCHITECTURES[codec_name][0]} as codec {codec_name!r}; see build_learned_codec."
    register_codec(codec_name)(factory)


for _name in ARCHITECTURES:
    _register(_name)
