"""Helpers the test modules share: run a script end to end in a scratch directory and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, cwd: Path, timeout: float = 600, check: bool = True,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs `python <repo>/<script> <args>` with `cwd` as working directory (so `runs/` lands there)."""
    # One intra-op thread: the test scripts run tiny networks, for which a second thread only adds synchronisation,
    # and on a busy machine two threads per process oversubscribe the cores (10-100x slowdowns seen here).
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=full_env, timeout=timeout,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def run_dirs(cwd: Path) -> list[Path]:
    """The run directories a script created under `cwd/runs`, oldest first."""
    return sorted((cwd / "runs").iterdir(), key=lambda p: p.stat().st_mtime) if (cwd / "runs").exists() else []


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars in the run's TensorBoard event files: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input must exit non-zero with one line on stderr (what is wrong and what to do) and no Python traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr.strip()
    assert message, "no error message on stderr"
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle.lower() in message.lower(), message


def textbook_reverse_chain(eps_fn, schedule, x, noise):
    """The DDPM sampler written step by step, to check each script's `reverse_chain` (which hoists work out of the
    loop). eps_fn(x_t, t) -> predicted noise with t a [N] tensor; the schedule has the scripts' attribute names."""
    for t in reversed(range(schedule.T)):
        eps = eps_fn(x, torch.full((len(x),), t))
        x0 = (schedule.sqrt_recip_alphas_cumprod[t] * x - schedule.sqrt_recipm1_alphas_cumprod[t] * eps).clamp(-1, 1)
        x = schedule.posterior_mean_coef1[t] * x0 + schedule.posterior_mean_coef2[t] * x
        if t > 0:
            x = x + schedule.posterior_std[t] * noise[t]
    return x
