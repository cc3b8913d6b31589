"""The stages' progress lines: the ETA counts from the first finished items, not from start-up."""
import logging

import prefect.artifacts

from flows import common


def test_eta_leaves_out_the_start_up_before_the_first_items(monkeypatch, caplog):
    clock = iter([0.0, 100.0, 110.0, 120.0])  # 100 s of start-up, then one item per 10 s
    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda **kwargs: "artifact")
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", lambda *args, **kwargs: None)
    progress = common.Progress(logging.getLogger("progress-test"), "images", 10, clock=lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="progress-test"):
        for _ in range(3):
            progress.advance(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "images: 1/10 (10%), 0.01/s, ETA after the next item"
    assert lines[1].endswith("ETA 80 s") and lines[2].endswith("ETA 70 s")  # 10 s per item, not 55 s
