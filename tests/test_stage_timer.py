"""Each stage logs its wall time and its own peak resident memory (``recbole_dealrec.utils.StageTimer``)."""
from __future__ import annotations

import logging
import time

import numpy as np

from recbole_dealrec.utils import StageTimer, resident_bytes


def test_each_stage_logs_its_own_peak(caplog):
    timer = StageTimer(sample_seconds=0.01)
    base = resident_bytes() / 2**30
    with caplog.at_level(logging.INFO):
        with timer("allocate"):
            block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched, held for many samples
            time.sleep(0.5)  # long enough for the sampling thread to run on a loaded machine (0.1 s missed it once)
            del block
        with timer("small"):
            time.sleep(0.05)
    assert timer.peak_gb["allocate"] >= base + 0.25
    assert timer.peak_gb["small"] < timer.peak_gb["allocate"] - 0.2  # freed: the next stage's peak is its own
    assert set(timer.seconds) == {"allocate", "small"} and timer.seconds["allocate"] >= 0.1
    assert f"[Time] allocate: {timer.seconds['allocate']:.1f} s, peak RSS {timer.peak_gb['allocate']:.2f} GB" in caplog.text
