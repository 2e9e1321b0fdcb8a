"""The GPU check's arithmetic where no GPU is: nvidia-smi's samples, the measured window, the busy fraction.
(tests/integration/test_gpu_check.py runs the whole check in its CPU smoke mode.)"""

from datetime import datetime

import pytest

from clipdr.benchmarks import gpu_check


def test_rates_fall_back_to_the_gpus_busy_window_when_no_shards_landed_apart(tmp_path):
    csv = tmp_path / "gpu.csv"
    # nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 200
    csv.write_text(
        "2026/12/04 01:00:00.000, 0\n2026/12/04 01:00:00.200, 80\n"
        "[Unknown Error]\n2026/12/04 01:00:00.400, 100\n2026/12/04 01:00:00.600, 0\n"
    )
    gpu = gpu_check._gpu_samples(csv)
    t0 = datetime(2026, 12, 4, 1, 0, 0).timestamp()
    assert [value for _, value in gpu] == [0, 80, 100, 0] and gpu[1][0] == pytest.approx(t0 + 0.2)
    (tmp_path / "reinforced").mkdir()  # no output shards: no steady window
    job = {"started": t0 - 10, "ended": t0 + 10, "num_rows": 64}
    start, end, samples, which = gpu_check._window(job, str(tmp_path / "reinforced"), gpu)
    assert (start, end, samples) == (gpu[1][0], gpu[2][0], 64) and which.startswith("GPU active")
    assert gpu_check._busy_fraction(gpu, start, end) == pytest.approx(0.9)
    assert gpu_check._window(job, str(tmp_path / "reinforced"), [])[3].startswith("whole job")
    assert gpu_check._busy_fraction([], start, end) is None
