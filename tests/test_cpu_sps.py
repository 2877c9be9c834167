"""benchmarks/cpu_sps.py: the rate arithmetic, the status-line reader on a fake script, and a --quick run end to end."""

import math
import os
import sys
import textwrap
import time

import pytest

from helpers import load_module


def load_cpu_sps():
    return load_module("benchmarks/cpu_sps.py", "cpu_sps")


cpu_sps = load_cpu_sps()


def test_steady_rate_excludes_warm_up():
    # 0-1000 in 100 s (slow warm-up), then 100 steps/s from step 1100 on; counting from 1100 must give exactly 100
    points = [(0.0, 0), (100.0, 1000), (101.0, 1100), (102.0, 1200), (104.0, 1400)]
    rate, windows = cpu_sps.steady_rate(points, count_from=1100)
    assert rate == pytest.approx(100.0)
    assert windows == pytest.approx([100.0, 100.0])
    all_rate, _ = cpu_sps.steady_rate(points, count_from=0)
    assert all_rate == pytest.approx(1400 / 104)  # a different, planted answer when the warm-up is counted
    assert math.isnan(cpu_sps.steady_rate(points, count_from=1400)[0])  # one counted line: no rate


def test_override_replaces_values_and_appends():
    assert cpu_sps.override(["--a", "1", "--no-x", "--b", "2"], ["--b", "3", "--c", "4"]) == \
        ["--a", "1", "--no-x", "--b", "3", "--c", "4"]


def test_run_one_times_status_lines_and_stops(tmp_path):
    # A fake script: a 1 s "warm-up", then a status line every 10 steps each 0.05 s (<= 200 steps/s), forever.
    fake = tmp_path / "fake.py"
    fake.write_text(textwrap.dedent("""
        import time
        print("starting", flush=True)
        time.sleep(1.0)
        step = 0
        while True:
            step += 10
            print(f"step {step:>10,} | SPS 0 | return 0.00", flush=True)
            time.sleep(0.05)
    """))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    points, ending = cpu_sps.run_one([sys.executable, str(fake)], stop_at=200, cwd=str(tmp_path), env=env, timeout=60)
    assert ending == "stopped"  # the endless script was stopped at step 200
    assert [s for _, s in points] == list(range(10, 210, 10))
    rate, _ = cpu_sps.steady_rate(points, count_from=20)
    assert 20 < rate <= 205  # the sleeps bound it at 200 steps/s; a busy machine only makes it slower
    assert rate > 1.5 * (200 / points[-1][0])  # the 1 s warm-up is not in the rate (with it: ~1x; without: ~2x)


def test_run_one_reports_a_failing_script(tmp_path):
    fake = tmp_path / "fail.py"
    fake.write_text("import sys\nprint('step 10 | x', flush=True)\nsys.exit(3)\n")
    points, ending = cpu_sps.run_one([sys.executable, str(fake)], stop_at=100, cwd=str(tmp_path),
                                     env={**os.environ}, timeout=60)
    assert ending == "exited 3" and [s for _, s in points] == [10]


def test_run_one_stops_a_silent_script_at_the_timeout(tmp_path):
    fake = tmp_path / "silent.py"
    fake.write_text("import time\ntime.sleep(60)\n")
    start = time.perf_counter()
    points, ending = cpu_sps.run_one([sys.executable, str(fake)], stop_at=100, cwd=str(tmp_path),
                                     env={**os.environ}, timeout=2)
    assert ending == "timed out" and points == [] and time.perf_counter() - start < 30


def test_quick_run_writes_results(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cpu-sps.md"
    assert cpu_sps.main(["--quick", "--scripts", "dacer", "diffusion_ql", "dtql", "--out", str(out)]) == 0
    text = out.read_text()
    assert "python benchmarks/cpu_sps.py --scripts dacer diffusion_ql dtql --quick" in text
    for row in ("| `dacer` |", "| `diffusion_ql --no-compile` |", "| `dtql --no-compile` |"):
        assert row in text
    assert "| --no-compile |" in text  # the DTQL / Diffusion-QL ratio row
    assert "torch " in text and "CPU " in text  # hardware and versions
    assert str(tmp_path) not in text and "MINARI_DATASETS_PATH=" not in text  # no machine paths
