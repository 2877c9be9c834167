"""What every script shares: time-based status lines with an ETA, the precision and backend in summary.json, and the
`--kernels auto` rule (PyTorch on a CUDA device unless kernels/ records a measured speed-up)."""

import re
import sys
import types

import pytest
import torch

import offline_data
from helpers import REPO, load_module, read_summary, run_dirs, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Tiny runs whose step-based status lines never fire (--log-frequency past the end): every status line they print
# comes from the time basis. --status-interval 1e-6 makes that a line after every step.
TIME_ONLY = ["--log-frequency", "1000000", "--status-interval", "1e-6"]
RUNS = {
    "sdac.py": ["--env-id", "Pendulum-v1", "--num-envs", "2", "--batch-size", "16", "--learning-starts", "32",
                "--num-particles", "4", "--num-reverse-samples", "8", "--diffusion-steps", "3", "--hidden-dim", "16",
                "--eval-episodes", "1", "--max-episode-steps", "20", "--total-timesteps", "48"],
    "dacer.py": ["--env-id", "Pendulum-v1", "--num-envs", "2", "--batch-size", "16", "--learning-starts", "32",
                 "--diffusion-steps", "3", "--hidden-dim", "16", "--entropy-samples", "8", "--em-iterations", "2",
                 "--eval-episodes", "1", "--max-episode-steps", "20", "--total-timesteps", "48"],
    "qvpo.py": ["--env-id", "Pendulum-v1", "--batch-size", "16", "--learning-starts", "32", "--train-samples", "4",
                "--behavior-samples", "2", "--target-samples", "2", "--eval-samples", "4", "--num-uniform", "3",
                "--diffusion-steps", "3", "--hidden-dim", "16", "--eval-episodes", "1", "--max-episode-steps", "20",
                "--total-timesteps", "48"],
    "diffusion_ql.py": ["--dataset-id", "test/hopper/random-v0", "--hidden-dim", "16", "--batch-size", "8",
                        "--diffusion-steps", "3", "--total-timesteps", "6", "--eval-frequency", "6",
                        "--eval-episodes", "1", "--eval-candidates", "2", "--no-compile"],
    "dtql.py": ["--dataset-id", "test/hopper/random-v0", "--hidden-dim", "16", "--batch-size", "8",
                "--pretrain-steps", "3", "--total-timesteps", "3", "--eval-frequency", "3", "--eval-episodes", "1",
                "--eval-candidates", "2", "--no-compile"],
}
# groups: step, SPS, ETA
STATUS = re.compile(r"^step +([\d,]+) .*\| SPS +([\d.]+) \| ETA (\d+:\d\d:\d\d|\?) \| (?:return|eval) ", re.M)


@pytest.mark.parametrize("script", list(RUNS))
def test_time_based_status_lines_report_eta_and_precision(script, tmp_path, minari_root):
    if script in ("diffusion_ql.py", "dtql.py"):
        offline_data.make_mujoco_dataset()
    env = {**ONE_THREAD, "MINARI_DATASETS_PATH": str(minari_root)}
    proc = run_script(script, *RUNS[script], *TIME_ONLY, cwd=tmp_path, env=env)
    lines = STATUS.findall(proc.stdout)
    assert len(lines) >= 3, proc.stdout  # one per step past the first (time basis only)
    assert any(eta != "?" for _, _, eta in lines)
    assert "precision ieee" in proc.stdout  # a CPU computes float32 matmuls in IEEE fp32, whatever the flag
    (run_dir,) = run_dirs(tmp_path)
    summary = read_summary(run_dir)
    assert summary["precision"] == "ieee"
    assert summary["kernels"] in ("torch", "none (no reverse chain)")


def test_default_status_interval_is_30_seconds_and_must_be_positive(tmp_path):
    proc = run_script("sdac.py", *RUNS["sdac.py"], "--status-interval", "0", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "--status-interval must be positive" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    for script in RUNS:  # the default, read from the Args dataclass of each script
        source = (REPO / script).read_text()
        assert "    status_interval: float = 30.0\n" in source, script


def load(script: str):
    return load_module(script, f"common_{script[:-3]}")


@pytest.mark.parametrize("script", ["sdac.py", "dacer.py", "qvpo.py", "diffusion_ql.py"])
def test_auto_picks_pytorch_on_cuda_unless_a_speed_up_is_recorded(script, monkeypatch):
    module = load(script)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # the kernels/ of this repository: nothing measured on a GPU yet, so auto is PyTorch everywhere
    for precision in ("ieee", "tf32", "bf16"):
        assert module.resolve_backend("auto", cuda, 256, precision) == "torch"
    assert module.resolve_backend("auto", cuda, 256) == "torch"  # the three-argument form
    assert module.resolve_backend("triton", cpu, 256) == "triton"  # an explicit choice is honoured
    assert module.resolve_backend("torch", cuda, 256) == "torch"
    # a kernels/ that records a speed-up for (H 256, bf16) turns auto on for that configuration only, and on CUDA only
    fake = types.ModuleType("kernels")
    fake.reverse_chain = lambda *a, **k: None
    fake.prefer_triton = lambda device, hidden_dim, precision: hidden_dim == 256 and precision == "bf16"
    monkeypatch.setitem(sys.modules, "kernels", fake)
    assert module.resolve_backend("auto", cuda, 256, "bf16") == "triton"
    assert module.resolve_backend("auto", cuda, 256, "tf32") == "torch"
    assert module.resolve_backend("auto", cuda, 512, "bf16") == "torch"
    assert module.resolve_backend("auto", cpu, 256, "bf16") == "torch"


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.9, "0:00:59"), (3725, "1:02:05"),
                                           (90000, "25:00:00"), (float("inf"), "?"), (-1, "?")])
def test_format_duration(seconds, text):
    for script in ("sdac.py", "dtql.py"):
        assert load(script).format_duration(seconds) == text


@pytest.mark.parametrize("script", list(RUNS))
def test_status_rate_leaves_the_evaluation_out(script, tmp_path, minari_root):
    # A mid-run evaluation of 60 episodes (online: up to 200 steps each) takes many training steps' time. The status
    # line right after it must still give the training rate, not one step over the evaluation (an SPS near 0 and an
    # ETA of hundreds of hours). Evaluation at env step 40 (online), after main step 4 (offline).
    if script in ("diffusion_ql.py", "dtql.py"):
        offline_data.make_mujoco_dataset()
        flags = [*RUNS[script], "--total-timesteps", "8", "--eval-frequency", "4"]
    else:
        flags = [*RUNS[script], "--max-episode-steps", "200", "--eval-frequency", "40"]
    env = {**ONE_THREAD, "MINARI_DATASETS_PATH": str(minari_root)}
    proc = run_script(script, *flags, "--eval-episodes", "60", *TIME_ONLY, cwd=tmp_path, env=env)
    rates = [(int(step.replace(",", "")), float(sps)) for step, sps, _ in STATUS.findall(proc.stdout)]
    evaluated_at = {e["step"] for e in read_summary(run_dirs(tmp_path)[0])["eval"]}
    after = [i for i, (step, _) in enumerate(rates[:-1]) if step in evaluated_at]  # the line after is rates[i + 1]
    assert after, proc.stdout
    later = sorted(sps for _, sps in rates[after[0] + 2:])  # training lines past it (online: past the warm-up)
    assert later, proc.stdout
    assert rates[after[0] + 1][1] > 0.1 * later[len(later) // 2], proc.stdout
