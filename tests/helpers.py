"""Helpers the test modules share: run a script end to end in a scratch directory and read what it wrote."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_module(path: str | Path, name: str):
    """Import a file of this repository under its own module name (a harness shares its script's file name)."""
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def run_harness(harness, capsys, args: list[str]) -> tuple[int, str]:
    """A parity harness's main(args) in this process: its exit code and stdout. The harness pins torch to one thread
    (as its speed mode needs); the suite's thread count is restored after it."""
    threads = torch.get_num_threads()
    try:
        code = harness.main(args)
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().out


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


def one_line_exit(script: str, fn, *args) -> str:
    """Calls fn(*args), which must stop through the script's fail(): returns its one-line "<script>: error: ..."."""
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    message = exc.value.code
    assert isinstance(message, str) and message.startswith(f"{script}: error:") and "\n" not in message, message
    return message


def assert_resume_rejects_bad_input(script: str, run_dir: Path, cwd: Path, env: dict[str, str] | None = None,
                                    extra: tuple = ()) -> None:
    """--resume with a flag that fixes the saved shapes changed, or with a file that is not a checkpoint (the run's
    summary.json), exits with one line naming the problem. `extra`: more (path, flags, needle) cases."""
    cases = ((run_dir / "checkpoint.pt", ["--hidden-dim", "64"], "--hidden-dim 64 differs"),
             (run_dir / "summary.json", [], "as a checkpoint"), *extra)
    for path, flags, needle in cases:
        proc = run_script(script, "--resume", str(path), *flags, cwd=cwd, check=False, env=env)
        assert_one_line_error(proc, f"{script}: error: --resume", needle)


def assert_capture_video_needs_moviepy(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    """--capture-video without moviepy is a one-line error before the run directory exists. A stub module that
    raises ImportError shadows moviepy, so this runs whether or not moviepy is installed."""
    hide = cwd / "hide-moviepy"
    hide.mkdir()
    (hide / "moviepy.py").write_text("raise ImportError('hidden by the test')\n")
    env = env or {}
    paths = [str(hide), env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))]
    proc = run_script(script, *args, "--capture-video", cwd=cwd, check=False,
                      env={**env, "PYTHONPATH": os.pathsep.join(p for p in paths if p)})
    assert_one_line_error(proc, f"{script}: error", "pip install moviepy")
    assert not run_dirs(cwd)


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
