"""benchmarks/official_diffusion_ql.py without the official code: a missing checkout is a one-line-per-step error
(exit 1, the clone commands), and a fake official package (a linear `Diffusion_QL` with the official constructor,
train and sample_action signatures, written in tmp_path) runs end to end on a small bandit dataset: summary.json and
eval scalars that report.py reads, the official schedule arguments, and an interrupted benchmark.py run resumed from
its checkpoint to the same final state as an uninterrupted one. Nothing is downloaded."""

import json
import math
import sys
import textwrap

import pytest
import torch
from helpers import REPO, read_summary, run_dirs, run_script, tensorboard_scalars

import offline_data

sys.path.insert(0, str(REPO / "benchmarks"))
import benchmark  # noqa: E402
import report  # noqa: E402

SCRIPT = "benchmarks/official_diffusion_ql.py"
DATASET = "toy/multimodal-bandit-v0"
TINY = ["--total-timesteps", "20", "--eval-frequency", "10", "--log-frequency", "5", "--eval-episodes", "2",
        "--batch-size", "8", "--checkpoint-frequency", "10"]

# The official interface, with a linear policy and critic: train() draws every batch from replay_buffer.sample, keeps
# the official step counter and steps its schedulers at the end of a call; sample_action takes one state. Every call's
# arguments are appended to calls.jsonl; FAKE_CRASH_AT stops the process at that step (an interrupted run).
FAKE_AGENT = textwrap.dedent('''
    import copy, json, os, sys
    import numpy as np
    import torch
    import torch.nn as nn
    from torch.optim.lr_scheduler import CosineAnnealingLR

    class Diffusion_QL(object):
        def __init__(self, state_dim, action_dim, max_action, device, discount, tau, max_q_backup=False, eta=1.0,
                     beta_schedule='linear', n_timesteps=100, ema_decay=0.995, step_start_ema=1000,
                     update_ema_every=5, lr=3e-4, lr_decay=False, lr_maxt=1000, grad_norm=1.0):
            self.kwargs = dict(discount=discount, tau=tau, max_q_backup=max_q_backup, eta=eta,
                               beta_schedule=beta_schedule, n_timesteps=n_timesteps, ema_decay=ema_decay,
                               step_start_ema=step_start_ema, update_ema_every=update_ema_every, lr=lr,
                               lr_decay=lr_decay, lr_maxt=lr_maxt, grad_norm=grad_norm, max_action=max_action)
            self.actor = nn.Linear(state_dim, action_dim).to(device)
            self.ema_model = copy.deepcopy(self.actor)
            self.critic = nn.Linear(state_dim + action_dim, 1).to(device)
            self.critic_target = copy.deepcopy(self.critic)
            self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=lr)
            self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=3e-4)
            self.lr_decay, self.step, self.device, self.tau = lr_decay, 0, device, tau
            if lr_decay:
                self.actor_lr_scheduler = CosineAnnealingLR(self.actor_optimizer, T_max=lr_maxt, eta_min=0.)
                self.critic_lr_scheduler = CosineAnnealingLR(self.critic_optimizer, T_max=lr_maxt, eta_min=0.)

        def train(self, replay_buffer, iterations, batch_size=100, log_writer=None):
            metric = {'bc_loss': [], 'ql_loss': [], 'actor_loss': [], 'critic_loss': []}
            for _ in range(iterations):
                if self.step == int(os.environ.get("FAKE_CRASH_AT", -1)):
                    sys.exit(3)
                state, action, next_state, reward, not_done = replay_buffer.sample(batch_size)
                assert state.shape[0] == action.shape[0] == batch_size and reward.shape == not_done.shape == (batch_size, 1)
                critic_loss = (self.critic(torch.cat([state, action], -1)) - reward).pow(2).mean()
                self.critic_optimizer.zero_grad(); critic_loss.backward(); self.critic_optimizer.step()
                bc_loss = (self.actor(state) - action).pow(2).mean()
                self.actor_optimizer.zero_grad(); bc_loss.backward(); self.actor_optimizer.step()
                with torch.no_grad():
                    for p, t in zip(self.critic.parameters(), self.critic_target.parameters()):
                        t.mul_(1 - self.tau).add_(self.tau * p)
                self.step += 1
                for k, v in (('bc_loss', bc_loss), ('ql_loss', 0.0 * bc_loss), ('actor_loss', bc_loss),
                             ('critic_loss', critic_loss)):
                    metric[k].append(float(v))
            if self.lr_decay:
                self.actor_lr_scheduler.step(); self.critic_lr_scheduler.step()
            with open("calls.jsonl", "a") as f:
                f.write(json.dumps({"end_step": self.step, "batch_size": batch_size, "stepped": self.lr_decay,
                                    "lr": self.actor_optimizer.param_groups[0]["lr"], "kwargs": self.kwargs}) + "\\n")
            return metric

        def sample_action(self, state):
            state = torch.FloatTensor(state.reshape(1, -1)).to(self.device)
            with torch.no_grad():
                action = self.actor(state) + 0.1 * torch.randn(1, self.actor.out_features)
            return action.clamp(-1, 1).cpu().numpy().flatten()
''')


@pytest.fixture
def fake_official(tmp_path):
    root = tmp_path / "fake-official"
    (root / "agents").mkdir(parents=True)
    (root / "agents" / "__init__.py").write_text("")
    (root / "agents" / "ql_diffusion.py").write_text(FAKE_AGENT)
    return root


@pytest.fixture
def env(minari_root, monkeypatch):
    """The subprocess environment: the datasets, and the repo root importable (the bandit env's entry point lives in
    tests/offline_data.py); set in os.environ too, for benchmark.py's workers."""
    offline_data.make_bandit_dataset(DATASET, episodes=50)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"MINARI_DATASETS_PATH": str(minari_root), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def test_missing_official_checkout_prints_the_clone_commands(tmp_path):
    proc = run_script(SCRIPT, "--official", str(tmp_path / "nowhere"), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "git clone https://github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL" in proc.stderr
    assert "checkout d871f5c" in proc.stderr and not run_dirs(tmp_path)


def test_end_to_end_with_a_fake_official_package_then_an_interrupted_benchmark_run_resumes(
        tmp_path, fake_official, env, monkeypatch):
    # an uninterrupted run: outputs as diffusion_ql.py's, official arguments of the locomotion row
    solo = tmp_path / "solo"
    solo.mkdir()
    run_script(SCRIPT, "--official", str(fake_official), "--dataset-id", DATASET, "--save-model", *TINY, "--lr-decay",
               cwd=solo, env=env, timeout=300)
    (run_dir,) = run_dirs(solo)
    assert run_dir.name.startswith("toy_multimodal-bandit-v0__official_diffusion_ql__1__")
    summary = read_summary(run_dir)
    assert summary["global_step"] == 20 and [e["step"] for e in summary["eval"]] == [10, 20]
    for key in ("args", "final_eval_return", "best_eval_return", "sps", "wall_seconds", "best_normalized_score",
                "last_normalized_score", "train_ms_per_step", "preset"):
        assert key in summary, key
    assert summary["preset"] == "hopper-medium-v2" and summary["args"]["total_timesteps"] == 20
    assert "bc_loss" in summary["eval"][0]  # the period means main.py's offline model selection ranks
    scalars = tensorboard_scalars(run_dir)
    assert [s for s, _ in scalars["eval/normalized_score"]] == [10, 20]
    assert "eval/episodic_return" in scalars and "losses/bc_loss" in scalars
    calls = [json.loads(line) for line in (solo / "calls.jsonl").read_text().splitlines()]
    assert [c["end_step"] for c in calls] == [5, 10, 15, 20] and {c["batch_size"] for c in calls} == {8}
    official_row = {"discount": 0.99, "tau": 0.005, "max_q_backup": False, "eta": 1.0, "beta_schedule": "vp",
                    "n_timesteps": 5, "ema_decay": 0.995, "step_start_ema": 1000, "update_ema_every": 5,
                    "lr": 3e-4, "lr_decay": True, "lr_maxt": 2000, "grad_norm": 9.0, "max_action": 1.0}
    assert {k: calls[0]["kwargs"][k] for k in official_row} == official_row
    # the schedulers step once per evaluation period (after the calls ending at 10 and 20), as in main.py
    assert [c["stepped"] for c in calls] == [False, True, False, True]
    cosine = [3e-4 * 0.5 * (1 + math.cos(math.pi * k / 2000)) for k in (0, 1, 1, 2)]
    assert [c["lr"] for c in calls] == pytest.approx(cosine, rel=1e-6)
    (table,) = [line for line in report.main(report.Args(runs=[str(solo / "runs")], out=str(tmp_path / "report"))
                                             ).splitlines() if line.startswith(f"| {DATASET} |")]
    assert "| official_diffusion_ql | 1 (1) | 20 grad |" in table

    # the same run through benchmark.py, interrupted at step 15 (after the checkpoint at 10), then resumed by
    # rerunning the launcher: it continues from step 10 and ends where the uninterrupted run ended
    grid = benchmark.Args(scripts=[SCRIPT], env_ids=[DATASET], num_seeds=1, runs_dir=str(tmp_path / "grid"),
                          extra=" ".join(["--official", str(fake_official), *TINY, "--lr-decay"]))
    monkeypatch.setenv("FAKE_CRASH_AT", "15")
    monkeypatch.setenv("MINARI_DATASETS_PATH", env["MINARI_DATASETS_PATH"])
    assert benchmark.main(grid) == [3]
    monkeypatch.delenv("FAKE_CRASH_AT")
    assert benchmark.plan(benchmark.expand(grid)[0])[0] == "resume"
    assert benchmark.main(grid) == [0]
    log = next((tmp_path / "grid" / "logs").glob("*.log")).read_text()
    assert "resumed" in log and "at step 10" in log
    (resumed_dir,) = run_dirs(tmp_path / "grid")
    assert [e["step"] for e in read_summary(resumed_dir)["eval"]] == [10, 20]
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (run_dir, resumed_dir))
    assert a["global_step"] == b["global_step"] == a["agent_step"] == b["agent_step"] == 20
    for name in ("actor", "critic", "critic_target", "ema_model", "actor_lr_scheduler"):
        for key, value in a[name].items():
            assert (torch.equal(value, b[name][key]) if torch.is_tensor(value) else value == b[name][key]), (name, key)
    assert [e["mean_return"] for e in a["eval"]] == [e["mean_return"] for e in b["eval"]]
    assert benchmark.plan(benchmark.expand(grid)[0])[0] == "skip"
