"""RoIAlign for the precoding's box path on CPU: torchvision's arithmetic, channels innermost.

torchvision's CPU RoIAlign loops over channels outermost, reading each channel plane with
scalar loads: about 40 to 60 us per RoI for the demo's 64 channels, about half of the batched
precoding's box-path time. This kernel runs the same float operations in the same order
(`pre_calc_for_bilinear_interpolate` and the per-bin sums of torchvision's
`roi_align_forward_kernel_impl`), with the channel loop innermost over a channels-last copy of
the input so the compiler vectorises it (an AVX2 copy where the CPU has one), each RoI's bins
summed in a small buffer and written out as one block in torchvision's (rois, C, h, w)
layout: bit for bit torchvision's values (pinned by tests/test_roi_align.py), several times
faster.

It is compiled with torch's C++ extension loader on first use (g++ and torch's headers, about
40 s once; cached under TORCH_EXTENSIONS_DIR, `.state/torch_extensions` for the CLI). Where
it cannot be built, or for a CUDA input, autograd or another dtype, `roi_align` is
torchvision's. MFIBA_ROI_ALIGN=torchvision forces torchvision's everywhere.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

# -ffp-contract=off: no fused multiply-adds, so each product and sum rounds as torchvision's
# do. No -march: the cached library may be loaded by another machine sharing the home folder.
_CFLAGS = ["-O3", "-ffp-contract=off"]
_NAME = "mfiba_roi_align_v3"  # change with the source: the extension cache is keyed by name
_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// One build runs on any x86-64 (no -march, see _CFLAGS); GCC and clang add an AVX2 copy of the
// pooling loop, picked at load time where the CPU has it: the same per-channel operations,
// eight channels at a time (no FMA, so the same roundings).
#if defined(__x86_64__) && defined(__GNUC__)
#define MFIBA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MFIBA_CLONES
#endif

// RoIs [first, last): each RoI's bins are summed into `acc` (bins x channels, channels
// innermost: contiguous vector loads and stores), then written out as one contiguous block in
// torchvision's (C, h, w) order (strided stores straight into the output cost more than the sums).
MFIBA_CLONES
static void pool_rois(int64_t first, int64_t last, const float* __restrict__ in, const float* __restrict__ roi_data,
                      float* __restrict__ out_data, float spatial_scale, int64_t channels, int64_t height,
                      int64_t width, int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                      bool aligned, int64_t bins) {
  std::vector<float> sums(channels * bins);  // one RoI's bins, channels innermost
  float* __restrict__ acc = sums.data();
  for (int64_t n = first; n < last; n++) {
    // As torchvision's roi_align_forward_kernel_impl, term for term.
    const float* roi = roi_data + n * 5;
    const int64_t b = static_cast<int64_t>(roi[0]);
    const float offset = aligned ? 0.5f : 0.0f;
    const float roi_start_w = roi[1] * spatial_scale - offset;
    const float roi_start_h = roi[2] * spatial_scale - offset;
    const float roi_end_w = roi[3] * spatial_scale - offset;
    const float roi_end_h = roi[4] * spatial_scale - offset;
    float roi_width = roi_end_w - roi_start_w;
    float roi_height = roi_end_h - roi_start_h;
    if (!aligned) {
      roi_width = std::max(roi_width, 1.f);
      roi_height = std::max(roi_height, 1.f);
    }
    const float bin_size_h = roi_height / static_cast<float>(pooled_height);
    const float bin_size_w = roi_width / static_cast<float>(pooled_width);
    const int grid_h = sampling_ratio > 0 ? sampling_ratio : std::ceil(roi_height / pooled_height);
    const int grid_w = sampling_ratio > 0 ? sampling_ratio : std::ceil(roi_width / pooled_width);
    const float count = std::max(grid_h * grid_w, 1);
    const float* __restrict__ image = in + b * height * width * channels;
    for (int ph = 0; ph < pooled_height; ph++) {
      for (int pw = 0; pw < pooled_width; pw++) {
        float* __restrict__ o = acc + (ph * pooled_width + pw) * channels;
        for (int64_t c = 0; c < channels; c++) o[c] = 0.f;
        for (int iy = 0; iy < grid_h; iy++) {
          const float yy = roi_start_h + ph * bin_size_h +
                           static_cast<float>(iy + .5f) * bin_size_h / static_cast<float>(grid_h);
          for (int ix = 0; ix < grid_w; ix++) {
            const float xx = roi_start_w + pw * bin_size_w +
                             static_cast<float>(ix + .5f) * bin_size_w / static_cast<float>(grid_w);
            float y = yy, xc = xx;
            if (y < -1.0 || y > height || xc < -1.0 || xc > width) {
              // torchvision samples position 0 with zero weights (0 * v, NaN stays NaN)
              for (int64_t c = 0; c < channels; c++)
                o[c] += 0.f * image[c] + 0.f * image[c] + 0.f * image[c] + 0.f * image[c];
              continue;
            }
            if (y <= 0) y = 0;
            if (xc <= 0) xc = 0;
            int y_low = static_cast<int>(y), x_low = static_cast<int>(xc), y_high, x_high;
            if (y_low >= height - 1) {
              y_high = y_low = height - 1;
              y = static_cast<float>(y_low);
            } else {
              y_high = y_low + 1;
            }
            if (x_low >= width - 1) {
              x_high = x_low = width - 1;
              xc = static_cast<float>(x_low);
            } else {
              x_high = x_low + 1;
            }
            const float ly = y - y_low, lx = xc - x_low, hy = 1.f - ly, hx = 1.f - lx;
            const float w1 = hy * hx, w2 = hy * lx, w3 = ly * hx, w4 = ly * lx;
            const float* __restrict__ v1 = image + (y_low * width + x_low) * channels;
            const float* __restrict__ v2 = image + (y_low * width + x_high) * channels;
            const float* __restrict__ v3 = image + (y_high * width + x_low) * channels;
            const float* __restrict__ v4 = image + (y_high * width + x_high) * channels;
            for (int64_t c = 0; c < channels; c++) o[c] += w1 * v1[c] + w2 * v2[c] + w3 * v3[c] + w4 * v4[c];
          }
        }
        for (int64_t c = 0; c < channels; c++) o[c] = o[c] / count;
      }
    }
    float* __restrict__ roi_out = out_data + n * channels * bins;  // (rois, C, h, w): contiguous per RoI
    for (int64_t c = 0; c < channels; c++)
      for (int64_t bin = 0; bin < bins; bin++) roi_out[c * bins + bin] = acc[bin * channels + c];
  }
}

torch::Tensor roi_align_channels_last(const torch::Tensor& input, const torch::Tensor& rois,
                                      double spatial_scale_d, int64_t pooled_height,
                                      int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(input.dim() == 4 && rois.dim() == 2 && rois.size(1) == 5, "mfiba::roi_align: bad shapes");
  TORCH_CHECK(input.scalar_type() == torch::kFloat && rois.scalar_type() == torch::kFloat,
              "mfiba::roi_align: float32 only");
  const auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const auto r = rois.contiguous();
  const int64_t channels = x.size(1), height = x.size(2), width = x.size(3), n_rois = r.size(0);
  auto out = torch::empty({n_rois, channels, pooled_height, pooled_width}, x.options());
  const float* in = x.data_ptr<float>();
  const float* roi_data = r.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const float spatial_scale = static_cast<float>(spatial_scale_d);
  const int64_t bins = pooled_height * pooled_width;
  at::parallel_for(0, n_rois, 8, [&](int64_t first, int64_t last) {
    pool_rois(first, last, in, roi_data, out_data, spatial_scale, channels, height, width, pooled_height,
              pooled_width, sampling_ratio, aligned, bins);
  });
  return out;
}

TORCH_LIBRARY(mfiba, m) {
  m.def("roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
        "int sampling_ratio, bool aligned) -> Tensor");
  m.impl("roi_align", torch::kCPU, &roi_align_channels_last);
}
"""

_lock = threading.Lock()
_state: dict = {}


def compiled_kernel():
    """The compiled op (torch.ops.mfiba.roi_align), or None where it cannot be built; tried
    once per process, a failure logged once with its reason."""
    with _lock:
        if "op" not in _state:
            _state["op"] = None
            if os.environ.get("MFIBA_ROI_ALIGN", "").lower() == "torchvision":
                _state["reason"] = "MFIBA_ROI_ALIGN=torchvision"
            else:
                try:
                    # its import warns that no CUDA runtime is found: irrelevant to a CPU kernel
                    cpp_log = logging.getLogger("torch.utils.cpp_extension")
                    level, cpp_log.level = cpp_log.level, logging.ERROR
                    try:
                        from torch.utils.cpp_extension import load_inline
                    finally:
                        cpp_log.setLevel(level)
                    load_inline(_NAME, cpp_sources=_SOURCE, extra_cflags=_CFLAGS, is_python_module=False)
                    _state["op"] = torch.ops.mfiba.roi_align
                except Exception as e:  # no compiler, no headers, a read-only cache...
                    _state["reason"] = f"{type(e).__name__}: {str(e).strip()[-300:]}"
                    log.warning("the channels-last RoIAlign could not be built; torchvision's (slower on CPU) "
                                "is used instead: %s", _state["reason"])
        return _state["op"]


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float,
              sampling_ratio: int, aligned: bool = False) -> torch.Tensor:
    """torchvision.ops.roi_align's result for (K, 5) `rois` (batch index, x1, y1, x2, y2);
    on CPU float32 without autograd from the compiled kernel."""
    from torchvision.ops import roi_align as torchvision_roi_align

    fast = (features.device.type == "cpu" and features.dtype == torch.float32 and rois.dtype == torch.float32
            and not (torch.is_grad_enabled() and (features.requires_grad or rois.requires_grad)))
    op = compiled_kernel() if fast else None
    if op is None:
        return torchvision_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    height, width = (output_size, output_size) if isinstance(output_size, int) else output_size
    return op(features, rois, float(spatial_scale), int(height), int(width), int(sampling_ratio), bool(aligned))
