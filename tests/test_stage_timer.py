"""Each stage logs its wall time and its own peak resident memory (``recbole_dealrec.utils.StageTimer``)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Run in a fresh interpreter: late in the suite the pytest process holds gigabytes of freed heap, and the 300 MiB
# block below can be carved out of pages that are already resident, so RSS need not rise at all (CI saw base and
# peak both at 5.203 GB). A fresh process has no such reserve, and the allocation shows as it does in a real job.
_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, time
    import numpy as np
    from recbole_dealrec.utils import StageTimer, resident_bytes

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    timer = StageTimer(sample_seconds=0.01)
    base = resident_bytes() / 2**30
    with timer("allocate"):
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched, held for many samples
        time.sleep(0.5)  # long enough for the sampling thread to run on a loaded machine
        del block
    with timer("small"):
        time.sleep(0.05)
    print(json.dumps({"base": base, "seconds": timer.seconds, "peak_gb": timer.peak_gb}))
    """
)


def test_each_stage_logs_its_own_peak():
    run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    base, seconds, peak_gb = result["base"], result["seconds"], result["peak_gb"]
    assert peak_gb["allocate"] >= base + 0.25
    assert peak_gb["small"] < peak_gb["allocate"] - 0.2  # freed: the next stage's peak is its own
    assert set(seconds) == {"allocate", "small"} and seconds["allocate"] >= 0.1
    assert f"[Time] allocate: {seconds['allocate']:.1f} s, peak RSS {peak_gb['allocate']:.2f} GB" in run.stderr


# Fresh interpreter again: the heap must start empty for its freed pages to show.
_FRAGMENTED = textwrap.dedent(
    """
    import json, logging, sys
    import torch
    from recbole_dealrec.utils import StageTimer, release_freed_memory, resident_bytes

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    def heap_churn():
        # 64 KB tensors sit on glibc's heap (below its mmap threshold); one in 100 stays alive, so the freed
        # pages lie between live blocks and glibc keeps them resident until malloc_trim
        blocks = [torch.ones(16_000) for _ in range(12_000)]  # ~0.77 GB
        return blocks[::100]
    gb = lambda: resident_bytes() / 2**30
    kept = heap_churn()
    held = gb()
    ran = release_freed_memory()
    released = gb()
    timer = StageTimer(sample_seconds=0.01)
    with timer("churn"):
        kept += heap_churn()
    after_stage = gb()
    print(json.dumps({"held": held, "ran": ran, "released": released, "after_stage": after_stage}))
    """
)


def test_freed_heap_goes_back_to_the_system_as_each_stage_ends():
    run = subprocess.run([sys.executable, "-c", _FRAGMENTED], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if not result["ran"]:
        pytest.skip("not glibc: no malloc_trim, nothing to release")
    assert result["released"] < result["held"] - 0.5  # the 0.76 GB of freed 64 KB blocks left the process
    assert result["after_stage"] < result["released"] + 0.3  # the timer released the stage's own churn


def test_a_stage_inside_another_is_counted_once(monkeypatch):
    """The surrogate trained inside the first signal that needs it: the outer stage keeps its own seconds only, so
    the stages add up to the time that passed (a clock that moves only when told)."""
    import time

    from recbole_dealrec.utils import StageTimer

    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    timer = StageTimer()
    with timer("influence signal"):
        now[0] += 2.0
        with timer("surrogate"):
            now[0] += 5.0
            with timer("surrogate: epoch"):
                now[0] += 1.0
        now[0] += 3.0
    with timer("training"):
        now[0] += 4.0
    assert timer.seconds == {"surrogate: epoch": 1.0, "surrogate": 5.0, "influence signal": 5.0, "training": 4.0}
    assert sum(timer.seconds.values()) == now[0] - 100.0
