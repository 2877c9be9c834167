"""The DTQL parity harness (benchmarks/parity/dtql.py) without the official code: the script against itself must pass
with every quantity compared, and each planted difference must be reported, where it belongs, so the harness cannot
pass silently. Also the two places where dtql.py rounds as the official code does (the harness shows why)."""

import math
import os
import subprocess
import sys

import pytest
import torch

import dtql
from helpers import REPO, load_module, run_harness

SMALL = ["--self-test", "--updates", "6", "--pretrain-updates", "2", "--batch-size", "32", "--hidden-dim", "32",
         "--transitions", "300", "--eval-states", "2", "--eval-candidates", "16", "--init-draws", "3",
         "--schedule-steps", "500"]


@pytest.fixture(scope="module")
def harness():
    return load_module("benchmarks/parity/dtql.py", "parity_dtql")


def run(harness, capsys, *extra) -> tuple[int, str]:
    return run_harness(harness, capsys, [*SMALL, *extra])


def mismatches(out: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith("MISMATCH"))
    return line.split(": ", 1)[1].split(", ")


def test_script_against_itself_passes_with_every_quantity_compared(harness, capsys):
    code, out = run(harness, capsys)
    assert code == 0, out
    assert "OK: " in out and "MISMATCH" not in out
    for row in ("| draw.sigma_bc (pretrain) |", "| loss.bc (pretrain) |", "| grad: critic.v (pretrain) |",
                "| draw.sigma_tr (main) |", "| policy_action (main) |", "| loss.trust_region (main) |",
                "| loss.q (main) |", "| loss.nll (main) |", "| loss.actor (main) |", "| loss.value (main) |",
                "| lr.actor (main) |", "| lr.critic (main) |", "| grad: actor (main) |",
                "| param_after_step: critic.q1 (main) |", "| target critic: q2 (main) |", "| Adam exp_avg_sq: actor (main) |",
                "| eval: candidate actions |", "| eval: chosen action |", "lr factor at every step of a 500-step schedule",
                "per-task table (20 official rows x 7 values)", "| init under one seed: bc_model |",
                "### Initialisation per layer, over seeds"):
        assert row in out, row
    # each main update compares every gradient of the three optimizers: 3 critic heads, BC model, policy
    assert "| grad: actor (main) | 48 |" in out  # 8 policy tensors x 6 updates


@pytest.mark.parametrize("perturbation, reported, only", [
    ("tau", "target critic: q1 (main)", "target critic"),  # Polyak tau x 1.01 on one side: only the target differs
    ("nll_weight", "loss.actor (main)", None),  # NLL weight + 1e-3: the policy loss and everything after it
    ("expectile", "grad: critic.v (pretrain)", None),  # IQL expectile + 1e-3: V's gradients from the first update
    ("eval_q", "eval: softmax(min Q_target) over candidates", "eval:"),  # softmax temperature 1/1.01 at evaluation
    ("init", "init under one seed: actor", "init under one seed: actor"),  # one initial weight + 1e-3
])
def test_a_planted_difference_is_reported(harness, capsys, perturbation, reported, only):
    code, out = run(harness, capsys, "--perturb", perturbation)
    assert code == 1, out
    bad = mismatches(out)
    assert reported in bad, bad
    if only:
        assert all(name.startswith(only) for name in bad), bad


def test_scripted_draws_are_each_used_once_with_the_asked_shape_and_kind(harness):
    rng = harness.ScriptedRNG({"randn": [torch.zeros(2, 3)]})
    with pytest.raises(AssertionError, match="shape"), rng.active():
        torch.randn(3, 2)
    with pytest.raises(AssertionError, match="left unused"), harness.ScriptedRNG({"randn": [torch.zeros(1)]}).active():
        pass
    with pytest.raises(AssertionError, match="extra call"), harness.ScriptedRNG({}).active():
        torch.randn_like(torch.zeros(2))
    with pytest.raises(AssertionError, match="float64"), harness.ScriptedRNG({"rand": [torch.zeros(4)]}).active():
        torch.rand(4)
    with pytest.raises(AssertionError, match="outside"), harness.ScriptedRNG({"randint": [torch.tensor([5])]}).active():
        torch.randint(0, 5, (1,))
    with pytest.raises(AssertionError, match="clips no gradient"), harness.ScriptedRNG({}).active():
        torch.nn.utils.clip_grad_norm_([torch.zeros(1, requires_grad=True)], 1.0)
    # the Normal's rsample draws through the patched _standard_normal; multinomial by the inverse CDF at u
    eps = torch.tensor([[0.5, -1.0]])
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
    rng = harness.ScriptedRNG({"standard_normal": [eps], "multinomial": [torch.tensor([0.25, 0.75], dtype=torch.float64)]})
    with rng.active():
        sample = torch.distributions.Normal(torch.zeros(1, 2), 2 * torch.ones(1, 2)).rsample()
        picks = torch.multinomial(probs, 1)
    assert torch.equal(sample, 2 * eps) and picks.squeeze(1).tolist() == [1, 1]
    assert torch.randn(3).shape == (3,)  # the real functions are back


def test_official_table_is_read_from_main_py_without_importing_it(harness, tmp_path):
    (tmp_path / "main.py").write_text("import d4rl\noffline_hyperparameters = {'t-v2': {'lr': 1e-4, 'alpha': 2.0}}\n")
    assert harness.official_table(str(tmp_path)) == {"t-v2": {"lr": 1e-4, "alpha": 2.0}}


def test_missing_official_checkout_prints_how_to_get_it(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "parity", "dtql.py"), "--official",
                           str(tmp_path / "absent")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert "git clone https://github.com/TianyuCodings/Diffusion_Trusted_Q_Learning" in proc.stderr
    assert "checkout 9a29cea" in proc.stderr


def test_speed_mode_times_the_script(harness, capsys):
    code, out = run(harness, capsys, "--speed", "--rounds", "1", "--calls", "1")
    assert code == 0 and "| dtql.py eager |" in out and "ms per DTQL main-loop update" in out


def test_log_prob_is_torch_normal_log_prob_bit_for_bit():
    """dtql.Actor.log_prob computes Normal(mu, exp(log_std)).log_prob op for op, as the official policy does; the
    shortcut exp(2 log_std) / log_std differs in the last bit, which Adam amplified to 3e-6 relative parameter
    differences in 6 updates of the parity harness."""
    torch.manual_seed(0)
    actor = dtql.Actor(5, 3, 1.0, 32)
    s, a = torch.randn(64, 5), torch.rand(64, 3) * 2 - 1
    a[0] = 1.0  # the edge of the action box, where atanh(a / 1.001) is steepest
    mu, log_std = actor(s)
    official = torch.distributions.Normal(mu, log_std.exp()).log_prob(torch.atanh(a / 1.001)).sum(-1, keepdim=True)
    assert torch.equal(actor.log_prob(s, a), official)


def test_target_critic_update_rounds_as_tau_online_plus_one_minus_tau_target():
    """train_step's Polyak update equals the official tau * param + (1 - tau) * target bit for bit (a lerp differs in
    the last bit: 4.5e-7 relative in the parity harness)."""
    args = dtql.resolve_preset(dtql.Args(preset="hopper-medium-v2", hidden_dim=16, batch_size=8, pretrain_steps=0,
                                         total_timesteps=10, compile=False))[0]
    torch.manual_seed(0)
    agent = dtql.build_agent(args, 4, 2, torch.device("cpu"))
    with torch.no_grad():  # a target that differs from the online critic
        for p in agent["critic_target"].parameters():
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in agent["critic_target"].parameters()]
    n = 50
    data = {"obs": torch.randn(n, 4), "next_obs": torch.randn(n, 4), "actions": torch.rand(n, 2) * 2 - 1,
            "rewards": torch.randn(n, 1), "not_dones": torch.ones(n, 1)}
    dtql.train_step(args, agent, data, 0)
    for t, o, p in zip(agent["critic_target"].parameters(), old, agent["critic"].parameters()):
        assert torch.equal(t, args.tau * p + (1 - args.tau) * o)
    assert not math.isclose(args.tau, 0.0)
