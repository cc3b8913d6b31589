"""The benchmark report (benchmarks/bench.py `markdown`): the MFIP goals table states every
codec's ratios and floor (kernels, plus a classical codec's own coding), and says which
codec was not run and why."""
from __future__ import annotations

from benchmarks.bench import markdown


def _mfip(codec: str, loop: float, batched: float, one: float, floor: float, coding: float = 0.0) -> dict:
    median = {"loop_s": loop, "batched_s": batched, "speedup": loop / batched, "loop_codec_s": 1.0,
              "loop_heads_s": 1.0, "loop_loss_s": 0.1, "batched_codec_s": 0.5, "batched_heads_s": 0.4,
              "batched_loss_s": 0.05, "one_encode_decode_s": one, "batched_over_one_encode_decode": batched / one,
              "max_weight_difference": 0.0, "kernel_floor_s": floor, "kernel_floor_over_one_encode_decode": floor / one,
              "coding_floor_s": coding, "floor_over_one_encode_decode": (floor + coding) / one}
    return {"inputs": {"codec": codec, "qualities": 8}, "median": median}


def test_mfip_goals_table_and_skipped_codec():
    results = {"machine": {"cores": 2}, "mfip": {
        "kernel_speed": {"synthesis_layer_gmac_per_s": 45.0, "sgemm_1024_gmac_per_s": 44.0, "threads": 1},
        "vbr": _mfip("mean-scale-vbr", 5.4, 1.35, 0.25, 0.8),
        "elic": {"skipped": "no runs/train-codec/elic-features/codec.pt: train it with `mfiba train-codec`"},
        "main": _mfip("avif", 4.2, 0.8, 0.04, 0.12, coding=0.24)}}
    md = markdown(results)
    assert "| mean-scale-vbr | vbr | 8 | 5.40 | 1.35 | 4.0x | 5.4 | 3.2 | 0.0 |" in md
    assert "| avif | main | 8 | 4.20 | 0.80 | 5.2x | 20.0 | 9.0 | 6.0 |" in md
    assert "Not run: elic: no runs/train-codec/elic-features/codec.pt" in md
    assert "45 GMAC/s" in md and "44 GMAC/s" in md
    assert "## MFIP precoding per image, codec `mean-scale-vbr`" in md
