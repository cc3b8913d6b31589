"""Rate units and codec measurements on stored features.

Three rate units, all kept and named (REFERENCE.md, 'Units'):
- `bpp_input`: bits over original input-image pixels, as a ratio of sums over the images
  (the MPEG / CompressAI-Vision convention, what reports state);
- `bpp_input_mean`: the per-image mean of bits / input pixels;
- `bits_per_mosaic_pixel`: bits over the coded mosaic's pixels (what the authors' code reports).
Rates come from the bytes of bitstream files, header and side information included.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from storage.bitstream import decode_stream, part_sizes, read_stream, write_stream
from storage.feature_store import FeatureStore
from tasks.codecs.base import FeatureCodec
from tasks.codecs.packing import PackInfo


@dataclass
class CodedImage:
    image_id: int
    stream_path: str
    bytes_total: int
    bits_per_scale: dict[str, int]  # bytes of each scale's part x 8 (side info included)
    estimated_bits_per_scale: dict[str, float]
    mosaic_pixels: dict[str, int]
    input_pixels: int
    seconds_encode: float
    seconds_decode: float
    mse_per_scale: dict[str, float]


def rate_units(bits, input_pixels, mosaic_pixels) -> dict[str, float]:
    """The three rate units from per-image bits, input pixels and coded mosaic pixels."""
    bits, pixels, mosaic = (np.asarray(v, dtype=np.float64) for v in (bits, input_pixels, mosaic_pixels))
    return {
        "bpp_input": float(bits.sum() / pixels.sum()),
        "bpp_input_mean": float(np.mean(bits / pixels)),
        "bits_per_mosaic_pixel": float(bits.sum() / max(1.0, mosaic.sum())),
    }


def rate_summary(images: list[CodedImage]) -> dict[str, float]:
    """The three rate units over a set of coded images."""
    return rate_units([8 * im.bytes_total for im in images], [im.input_pixels for im in images],
                      [sum(im.mosaic_pixels.values()) for im in images])


def code_image(codec: FeatureCodec, features: "OrderedDict[str, torch.Tensor]", phi, stream_path: str | Path,
               input_pixels: int, image_id: int, derived=(), estimate: bool = True) -> CodedImage:
    """Encode to a bitstream file, then decode from that file alone, and measure."""
    t0 = time.perf_counter()
    data = codec.compress(features, phi, derived=derived)
    t1 = time.perf_counter()
    write_stream(stream_path, data)
    decoded = codec.decompress(read_stream(stream_path))
    t2 = time.perf_counter()
    sizes = part_sizes(data)
    _header, parts = decode_stream(data)
    mosaic_pixels, estimated = {}, {}
    for p in parts:
        if p.derived:
            mosaic_pixels[p.scale] = 0
            if estimate and hasattr(codec, "estimate_bits"):
                estimated[p.scale] = 0.0
            continue
        info = PackInfo.from_dict(p.packing)
        mosaic_pixels[p.scale] = info.padded_height * info.padded_width
        if estimate and hasattr(codec, "estimate_bits"):
            from tasks.codecs.packing import normalise, pack

            y, _ = normalise(features[p.scale].float(), mode=codec.norm_mode)
            mosaic, _ = pack(y, stride=codec.stride)
            estimated[p.scale] = float(codec.estimate_bits(mosaic, p.phi))
    mse = {s: float(torch.mean((decoded[s].float() - features[s].float()) ** 2)) for s in features}
    return CodedImage(image_id, str(stream_path), len(data),
                      {s: 8 * sizes[s] for s in features}, estimated, mosaic_pixels, input_pixels,
                      t1 - t0, t2 - t1, mse)


def measure_codec(codec: FeatureCodec, store: FeatureStore, image_ids: list[int], phis, out_dir: str | Path,
                  derived=(), estimate: bool = True) -> pd.DataFrame:
    """One row per (image, phi, scale): real and estimated bits, times, MSE and rate units."""
    out_dir = Path(out_dir)
    rows = []
    for phi in phis:
        for iid in image_ids:
            feats = OrderedDict((k, torch.from_numpy(v.astype(np.float32))) for k, v in store.read_image(iid).items())
            h, w = store.read_attrs(iid)["input_size"]
            coded = code_image(codec, feats, phi, out_dir / f"phi{phi:g}" / f"{iid}.mfbs", h * w, iid,
                               derived=derived, estimate=estimate)
            for s in feats:
                rows.append({
                    "codec": codec.name, "phi": phi, "image_id": iid, "scale": s, "derived": s in derived,
                    "bits": coded.bits_per_scale[s], "estimated_bits": coded.estimated_bits_per_scale.get(s, np.nan),
                    "mosaic_pixels": coded.mosaic_pixels[s], "input_pixels": coded.input_pixels,
                    "bytes_total": coded.bytes_total, "mse": coded.mse_per_scale[s], "elements": feats[s].numel(),
                    "seconds_encode": coded.seconds_encode, "seconds_decode": coded.seconds_decode,
                })
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per codec and phi: the three rate units (real and estimated), gap, times, MSE per scale."""
    out = []
    for (codec, phi), g in table.groupby(["codec", "phi"]):
        per_image = g.groupby("image_id").agg(bytes_total=("bytes_total", "first"), input_pixels=("input_pixels", "first"),
                                              mosaic_pixels=("mosaic_pixels", "sum"), est=("estimated_bits", lambda x: x.sum(min_count=1)),
                                              enc=("seconds_encode", "first"), dec=("seconds_decode", "first"))
        bits = 8.0 * per_image.bytes_total
        row = {"codec": codec, "phi": phi, "images": len(per_image),
               **rate_units(bits, per_image.input_pixels, per_image.mosaic_pixels),
               "bpp_input_estimated": per_image.est.sum(min_count=len(per_image)) / per_image.input_pixels.sum(),
               "seconds_encode": per_image.enc.mean(), "seconds_decode": per_image.dec.mean()}
        row["estimate_gap_percent"] = 100 * (row["bpp_input"] - row["bpp_input_estimated"]) / row["bpp_input"]
        # All scales together: squared error over every feature value of every image.
        row["mse_all"] = float((g.mse * g.elements).sum() / g.elements.sum())
        row["feature_psnr_db"] = float(-10 * np.log10(max(row["mse_all"], 1e-30)))
        for s, gs in g.groupby("scale"):
            row[f"mse_{s}"] = gs.mse.mean()
            row[f"bits_share_{s}"] = gs.bits.sum() / bits.sum()
        out.append(row)
    return pd.DataFrame(out)


def retrained_vs_rgb(summary: pd.DataFrame) -> pd.DataFrame:
    """BD-rate on feature PSNR of each codec retrained on features against the same
    architecture trained on RGB images ('pool' coded): the codec issue's quality bar."""
    from tasks.bdrate import METHODS, bd_rate

    rows = []
    coded = summary[summary["pool"] == "coded"]
    # Curves are per configured role (label): two roles of one architecture are not mixed.
    for test_label, test in coded[coded.trained_on == "features"].groupby("label"):
        codec = test.codec.iloc[0]
        for anchor_label, anchor in coded[(coded.codec == codec) & (coded.trained_on == "rgb")].groupby("label"):
            for method in METHODS:
                res = bd_rate(anchor.bpp_input, anchor.feature_psnr_db, test.bpp_input, test.feature_psnr_db,
                              method=method)
                rows.append({"codec": codec, "test": test_label, "anchor": anchor_label, "interpolation": method,
                             "bd_rate_percent": res.bd_rate_percent, "non_monotonic": res.non_monotonic,
                             "note": res.reason})
    return pd.DataFrame(rows)
