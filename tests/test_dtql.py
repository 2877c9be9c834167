"""dtql.py: EDM pieces, the trust-region and IQL losses, the policy, presets, end-to-end runs with resume, the
multimodal bandit and the error paths."""

import functools
import math
import sys
import types

import gymnasium as gym
import minari
import numpy as np
import offline_data
import pytest
import torch
import torch.nn.functional as F
from helpers import (assert_capture_video_needs_moviepy, assert_one_line_error, assert_resume_rejects_bad_input,
                     read_summary, run_dirs, run_script, tensorboard_scalars)
from minari.data_collector import EpisodeBuffer

import dtql
import helpers

# Small nets and batches: the scripts' code paths, at a size a 2-core CPU runs in seconds. One intra-op thread: these
# nets are too small to gain from more, and a busy machine makes oversubscribed threads many times slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TINY = ["--dataset-id", "test/hopper/random-v0", "--batch-size", "32", "--hidden-dim", "32", "--eval-episodes", "2",
        "--eval-candidates", "16", "--log-frequency", "5"]

one_line_exit = functools.partial(helpers.one_line_exit, "dtql.py")  # fn, *args -> its one-line error


def test_edm_preconditioning_values():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0])
    c_skip, c_out, c_in = dtql.edm_scalings(sigma, 0.5)
    assert c_skip.shape == c_out.shape == c_in.shape == (4, 1)
    # sigma = sigma_data: c_skip = 1/2, c_out = sigma_data / sqrt(2), c_in = 1 / (sigma_data sqrt(2))
    assert c_skip[1].item() == pytest.approx(0.5)
    assert c_out[1].item() == pytest.approx(0.5 / math.sqrt(2))
    assert c_in[1].item() == pytest.approx(math.sqrt(2))
    # sigma = 1: 0.25 / 1.25, 0.5 / sqrt(1.25), 1 / sqrt(1.25)
    np.testing.assert_allclose([c_skip[2].item(), c_out[2].item(), c_in[2].item()],
                               [0.2, 0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25)], rtol=1e-6)
    # limits: tiny sigma keeps the input (c_skip -> 1, c_out -> sigma), huge sigma predicts from scratch
    assert c_skip[0].item() == pytest.approx(1.0, abs=2e-5) and c_out[0].item() == pytest.approx(0.002, rel=1e-4)
    assert c_skip[3].item() == pytest.approx(0.25 / 6400.25) and c_out[3].item() == pytest.approx(0.5, rel=1e-4)
    # EDM's design: unit-variance network input c_in^2 (sigma^2 + sigma_data^2) = 1 and unit-variance effective target
    # (x - c_skip x_noisy) / c_out for x of variance sigma_data^2: ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2 = 1
    s2 = sigma[:, None] ** 2
    torch.testing.assert_close(c_in**2 * (s2 + 0.25), torch.ones(4, 1))
    torch.testing.assert_close(((1 - c_skip) ** 2 * 0.25 + c_skip**2 * s2) / c_out**2, torch.ones(4, 1))


def test_sigma_sampling_quantiles_and_truncation():
    torch.manual_seed(0)
    sigma = dtql.sample_sigma(200_000, 0.5, 0.002, 80.0, "cpu")
    assert sigma.dtype == torch.float32 and sigma.min() >= 0.002 and sigma.max() <= 80.0
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    empirical = torch.quantile(sigma[:100_000], qs).numpy()  # torch.quantile caps the input size
    # Truncated log-logistic(loc=ln 0.5, scale=0.5): inverse CDF on [F(0.002), F(80)].
    lo, hi = [1 / (1 + math.exp(-(math.log(v) - math.log(0.5)) / 0.5)) for v in (0.002, 80.0)]
    analytic = [math.exp(math.log(0.5) + 0.5 * math.log(u / (1 - u))) for u in (lo + qs.numpy() * (hi - lo))]
    np.testing.assert_allclose(empirical, analytic, rtol=0.03)
    np.testing.assert_allclose(empirical, [0.115, 0.289, 0.5, 0.866, 2.18], rtol=0.03)  # reference sheet §2.2


def test_edm_loss_hand_checked_with_clamp():
    class Const(torch.nn.Module):  # F(.) = value everywhere
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, x, state, t):
            return torch.full_like(x, self.value)

    x = torch.tensor([[0.2, -0.4]])
    sigma, noise = torch.tensor([0.5]), torch.tensor([[1.0, 2.0]])
    x_noisy = x + 0.5 * noise  # [0.7, 0.6]
    c_skip, c_out = 0.5, 0.5 / math.sqrt(2)
    denoised = (c_skip * x_noisy + c_out).clamp(-1, 1)  # [0.7036, 0.6536]
    expected = (((denoised - x) / c_out) ** 2).mean()
    got = dtql.edm_loss(Const(1.0), x, torch.zeros(1, 3), sigma, noise, 0.5, 1.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # with a large sigma the denoiser output is clamped to +-max_action before the loss
    got_big = dtql.edm_loss(Const(3.0), x, torch.zeros(1, 3), torch.tensor([10.0]), noise, 0.5, 1.0)
    c_skip, c_out = 0.25 / 100.25, 5.0 / math.sqrt(100.25)
    d = (c_skip * (x + 10.0 * noise) + 3.0 * c_out).clamp(-1, 1)
    assert (c_skip * (x + 10.0 * noise) + 3.0 * c_out).min() > 1  # the clamp is active in this case
    assert got_big.item() == pytest.approx((((d - x) / c_out) ** 2).mean().item(), rel=1e-6)


def test_trust_region_loss_has_gradients_through_input_and_target():
    torch.manual_seed(0)
    model = dtql.ScoreNetwork(3, 2, 32, 16)
    s, sigma, noise = torch.randn(8, 3), dtql.sample_sigma(8, 0.5, 0.002, 80.0, "cpu"), torch.randn(8, 2)
    sigma = sigma.clamp(max=1.0)  # keep the denoiser clamp inactive so both paths carry gradient
    a = (0.3 * torch.randn(8, 2)).requires_grad_(True)
    (g_total,) = torch.autograd.grad(dtql.edm_loss(model, a, s, sigma, noise, 0.5, 1.0), a)

    def loss_with(x_input, x_target):  # the same loss with the two uses of x separated
        c_skip, c_out, c_in = dtql.edm_scalings(sigma, 0.5)
        x_noisy = x_input + noise * sigma[:, None]
        d = (c_skip * x_noisy + c_out * model(c_in * x_noisy, s, torch.log(sigma) / 4)).clamp(-1, 1)
        return (((d - x_target) / c_out) ** 2).mean()

    (g_input,) = torch.autograd.grad(loss_with(a, a.detach()), a)
    (g_target,) = torch.autograd.grad(loss_with(a.detach(), a), a)
    assert g_input.abs().sum() > 1e-3 and g_target.abs().sum() > 1e-3
    torch.testing.assert_close(g_total, g_input + g_target)
    assert not torch.allclose(g_total, g_target) and not torch.allclose(g_total, g_input)


def test_policy_loss_trains_only_the_policy_and_reaches_it_through_both_terms():
    torch.manual_seed(0)
    actor, bc, critic = dtql.Actor(3, 2, 1.0, 32), dtql.ScoreNetwork(3, 2, 32, 16), dtql.Critic(3, 2, 32)
    s, a = torch.randn(16, 3), torch.rand(16, 2) * 1.8 - 0.9
    eps, sigma, noise = torch.randn(16, 2), dtql.sample_sigma(16, 0.5, 0.002, 80.0, "cpu"), torch.randn(16, 2)
    frozen = [*bc.parameters(), *critic.parameters()]
    for p in frozen:  # as the training loop does
        p.requires_grad_(False)
    total, tr, ql, nll = dtql.policy_loss(actor, bc, critic, s, a, eps, sigma, noise, 2.0, 0.5, 0.5)
    torch.testing.assert_close(total, 2.0 * tr + ql + 0.5 * nll)
    a_pi = actor.sample(s, eps)  # the same reparameterised actions: L_TR and L_Q by hand
    torch.testing.assert_close(tr, dtql.edm_loss(bc, a_pi, s, sigma, noise, 0.5, 1.0))
    torch.testing.assert_close(ql, -critic.q_min(s, a_pi).mean())
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.parameters())
    assert all(p.grad is None for p in [*bc.parameters(), *critic.parameters()])
    # gamma = 0 skips the NLL term
    _, _, _, nll0 = dtql.policy_loss(actor, bc, critic, s, a, eps, sigma, noise, 1.0, 0.0, 0.5)
    assert nll0.item() == 0.0


def losses_and_grads(critic_fn, edm_fn, policy_fn):
    """One step's three losses (critic, BC, policy) and the gradients the loop steps with; Hopper-sized with TINY's
    width and batch, so the smoke run's compiled losses can come from inductor's cache."""
    torch.manual_seed(0)
    S, A, B, H = 11, 3, 32, 32
    bc, actor, critic = dtql.ScoreNetwork(S, A, H, 16), dtql.Actor(S, A, 1.0, H), dtql.Critic(S, A, H)
    s, s2, a = torch.randn(B, S), torch.randn(B, S), torch.rand(B, A) * 1.8 - 0.9
    r, not_done = torch.randn(B, 1), (torch.rand(B, 1) > 0.1).float()
    sigma, eps, noise = dtql.sample_sigma(B, 0.5, 0.002, 80.0, "cpu"), torch.randn(B, A), torch.randn(B, A)
    critic_total = critic_fn(critic, s, a, r, s2, not_done, 0.99, 0.7)[0]
    bc_total = edm_fn(bc, a, s, sigma, noise, 0.5, 1.0)
    (critic_total + bc_total).backward()
    grads = [p.grad.clone() for p in [*critic.parameters(), *bc.parameters()]]
    for p in [*bc.parameters(), *critic.parameters()]:
        p.requires_grad_(False)
    policy = policy_fn(actor, bc, critic, s, a, eps, sigma, noise, 1.0, 0.5, 0.5)
    policy[0].backward()
    return [critic_total, bc_total, *policy], grads + [p.grad for p in actor.parameters()]


def test_compiled_losses_give_the_eager_losses_and_gradients():
    """--compile fuses the three losses (one-exp Mish inside); the math must stay the eager one."""
    eager = losses_and_grads(dtql.critic_loss, dtql.edm_loss, dtql.policy_loss)
    compiled = losses_and_grads(*(torch.compile(f, dynamic=False) for f in (dtql.critic_loss, dtql.edm_loss,
                                                                             dtql.policy_loss)))
    for c, e in zip(compiled[0], eager[0]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    for c, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


def test_one_exp_mish_matches_f_mish():
    z = torch.cat([torch.linspace(-100.0, 60.0, 801, dtype=torch.float64), torch.tensor([0.0, 19.99, 20.0, 20.01])])
    torch.testing.assert_close(dtql.mish_one_exp(z), F.mish(z), rtol=1e-12, atol=1e-12)


def test_expectile_loss_hand_checked():
    diff = torch.tensor([2.0, -1.0, 0.0, 0.5])  # q - v
    # tau where q > v, 1 - tau elsewhere (official torch.where(diff > 0, tau, 1 - tau))
    np.testing.assert_allclose(dtql.expectile_loss(diff, 0.7).numpy(), [0.7 * 4, 0.3 * 1, 0.0, 0.7 * 0.25], rtol=1e-6)
    # its minimiser over a constant v is the tau-expectile: v* solves tau sum(q>v)(q - v) = (1-tau) sum(q<v)(v - q);
    # by hand for v in (2, 10): 0.9 (10 - v) = 0.1 (3v - 3)  ->  v = 9.3 / 1.2 = 7.75
    q = torch.tensor([0.0, 1.0, 2.0, 10.0])
    grid = torch.linspace(0.0, 10.0, 100_001)  # [G]
    losses = dtql.expectile_loss(q[None, :] - grid[:, None], 0.9).mean(1)  # [G]
    assert grid[losses.argmin()].item() == pytest.approx(7.75, abs=1e-3)


def test_critic_loss_uses_online_v_target_and_detached_min_q():
    torch.manual_seed(0)
    critic = dtql.Critic(3, 2, 16)
    s, a, s2 = torch.randn(5, 3), torch.rand(5, 2), torch.randn(5, 3)
    r, not_done = torch.randn(5, 1), torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0]])
    total, v_loss, q1_loss, q2_loss, q1, q2 = dtql.critic_loss(critic, s, a, r, s2, not_done, 0.99, 0.7)
    with torch.no_grad():
        y = r + 0.99 * not_done * critic.v(s2)
        q_min = torch.min(*critic(s, a))
        v_expected = dtql.expectile_loss(q_min - critic.v(s), 0.7).mean()
    torch.testing.assert_close(q1_loss, ((q1 - y) ** 2).mean())
    torch.testing.assert_close(q2_loss, ((q2 - y) ** 2).mean())
    torch.testing.assert_close(v_loss, v_expected)
    torch.testing.assert_close(total, v_loss + q1_loss + q2_loss)
    # the value loss moves only V (its Q target is detached)
    grads = torch.autograd.grad(v_loss, list(critic.q1.parameters()) + list(critic.v.parameters()), allow_unused=True)
    assert all(g is None for g in grads[: len(list(critic.q1.parameters()))])
    assert all(g is not None for g in grads[len(list(critic.q1.parameters())):])


def test_networks_follow_the_official_shapes():
    net = dtql.ScoreNetwork(11, 3, 256, 16)
    linears = [m for m in net.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3 + 11 + 16, 256), (256, 256), (256, 256),
                                                                  (256, 256), (256, 3)]
    assert isinstance(net.net[1], torch.nn.Linear)  # official quirk: no activation after the first Linear
    assert net(torch.randn(4, 3), torch.randn(4, 11), torch.randn(4)).shape == (4, 3)
    critic = dtql.Critic(11, 3, 256)
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in critic.q1) == 3
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in critic.v)
    actor = dtql.Actor(11, 3, 1.0, 256)
    hidden = actor.net[2].weight  # square hidden layer: orthogonal init gives W W^T = I, biases zero
    torch.testing.assert_close(hidden @ hidden.T, torch.eye(256), atol=1e-4, rtol=0)
    assert all(m.bias.abs().sum() == 0 for m in actor.net if isinstance(m, torch.nn.Linear))


def test_policy_log_std_bounds_sampling_and_log_prob():
    torch.manual_seed(0)
    actor = dtql.Actor(2, 2, 1.0, 16)
    with torch.no_grad():
        actor.net[-1].bias.copy_(torch.tensor([0.1, -0.2, 9.0, -9.0]))  # log_std pre-clamp = +-9
    s = torch.zeros(3, 2)
    mu, log_std = actor(s)
    np.testing.assert_allclose(log_std.detach().numpy(), [[2.0, -5.0]] * 3)
    a = torch.tensor([[0.5, -0.3]] * 3)
    z = torch.atanh(a / 1.001)
    expected = torch.distributions.Normal(mu, log_std.exp()).log_prob(z).sum(-1, keepdim=True)
    torch.testing.assert_close(actor.log_prob(s, a), expected)  # no tanh Jacobian, as the official code
    samples = actor.sample(torch.zeros(4000, 2))
    assert samples.abs().max() <= 1.0
    assert abs(samples[:, 1].mean().item() - math.tanh(-0.2)) < 0.01  # std e^-5: essentially tanh(mu)
    torch.testing.assert_close(actor.deterministic(s), torch.tanh(mu))


def test_select_actions_draws_by_softmax_of_target_q():
    torch.manual_seed(0)
    actor, critic = dtql.Actor(2, 1, 1.0, 16), dtql.Critic(2, 1, 16)
    critic.q_min = lambda s, a: 50.0 * a  # [N, 1]: softmax over candidates is ~argmax, the largest candidate wins
    obs = torch.randn(3, 2)
    picked = dtql.select_actions(actor, critic, obs, 512)
    assert picked.shape == (3, 1) and (picked > 0.5).all()
    torch.testing.assert_close(dtql.select_actions(actor, critic, obs, 512, deterministic=True),
                               actor.deterministic(obs))


def test_presets_and_cosine_schedule():
    assert dtql.official_task("mujoco/hopper/medium-v0") == "hopper-medium-v2"
    assert dtql.official_task("D4RL/antmaze/umaze-diverse-v1") == "antmaze-umaze-diverse-v0"
    assert dtql.official_task("D4RL/pen/cloned-v2") == "pen-cloned-v1"
    assert dtql.official_task("mujoco/hopper/expert-v0") is None
    args, task = dtql.resolve_preset(dtql.Args(dataset_id="D4RL/antmaze/large-diverse-v1"))
    assert task == "antmaze-large-diverse-v0"
    assert (args.lr, args.alpha, args.nll_weight, args.lr_decay, args.batch_size, args.expectile) == (
        3e-4, 0.5, 1.0, False, 2048, 0.9)
    assert (args.total_timesteps, args.eval_episodes, args.reward_tune) == (300_000, 100, "iql_antmaze")
    args, task = dtql.resolve_preset(dtql.Args(dataset_id="mujoco/hopper/medium-v0", alpha=2.0, batch_size=64))
    assert task == "hopper-medium-v2" and (args.lr, args.alpha, args.lr_decay, args.batch_size) == (1e-4, 2.0, True, 64)
    assert (args.eval_episodes, args.reward_tune, args.total_timesteps) == (10, "no", 1_000_000)
    assert dtql.resolve_preset(dtql.Args(dataset_id="mujoco/walker2d/expert-v0"))[1] == "hopper-medium-v2"
    # no official twin: the family is the id's env component exactly ("pen" is in invertedpendulum, "kitchen" in
    # kitchensink); door, hammer and relocate are pen's Adroit siblings
    family = {"mujoco/invertedpendulum/medium-v0": "hopper-medium-v2", "toy/kitchensink/random-v0": "hopper-medium-v2",
              "D4RL/pen/expert-v2": "pen-human-v1", "D4RL/door/human-v2": "pen-human-v1",
              "D4RL/hammer/cloned-v2": "pen-human-v1", "D4RL/relocate/expert-v2": "pen-human-v1",
              "D4RL/antmaze/giant-stitch-v1": "antmaze-medium-diverse-v0", "D4RL/Kitchen/other-v2": "kitchen-partial-v0",
              "pen-human-v1": "hopper-medium-v2", "D4RL/pointmaze/umaze-v2": "hopper-medium-v2"}
    for dataset_id, expected in family.items():
        assert dtql.resolve_preset(dtql.Args(dataset_id=dataset_id))[1] == expected, dataset_id
    door, _ = dtql.resolve_preset(dtql.Args(dataset_id="D4RL/door/human-v2"))
    assert (door.lr, door.alpha, door.eval_episodes, door.reward_tune) == (3e-5, 1500.0, 100, "no")
    assert dtql.official_task("mujoco/invertedpendulum/medium-v0") is None and dtql.env_name("pen-human-v1") == ""
    assert dtql.resolve_preset(dtql.Args(dataset_id="x/kitchen-ish", preset="pen-cloned-v1"))[0].lr == 1e-5
    # CosineAnnealingLR(T_max=N) stepped once per step: step m runs at 0.5 (1 + cos(pi m / N))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40, eta_min=0.0)
    for m in range(40):
        assert dtql.cosine_factor(m, 40) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        sched.step()


def test_smoke_run_logs_and_resumes_exactly(tmp_path, minari_root):
    offline_data.make_mujoco_dataset()
    common = [*TINY, "--pretrain-steps", "10", "--eval-frequency", "10", "--lr-decay", "False", "--save-model"]
    straight = tmp_path / "straight"
    straight.mkdir()
    proc = run_script("dtql.py", *common, "--total-timesteps", "20", cwd=straight, env=ONE_THREAD)
    assert "pretrain" in proc.stdout and "main" in proc.stdout
    (run_dir,) = run_dirs(straight)
    summary = read_summary(run_dir)
    assert summary["global_step"] == 30 and summary["pretrain_steps"] == 10 and summary["preset"] == "hopper-medium-v2"
    assert [e["step"] for e in summary["eval"]] == [20, 30]
    for key in ("final_eval_return", "best_eval_return", "sps", "wall_seconds", "best_normalized_score",
                "last_normalized_score", "train_ms_per_step", "main_ms_per_step"):
        assert summary[key] is not None, key
    assert summary["last_normalized_score"] == pytest.approx(summary["eval"][-1]["normalized_score"])
    assert summary["compile"] is True  # the compiled losses, also through the bit-identical resume below
    scalars = tensorboard_scalars(run_dir)
    for tag in ("charts/SPS", "losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss", "losses/qf1_values",
                "losses/actor_loss", "losses/alpha", "losses/bc_loss", "losses/value_loss", "losses/trust_region_loss",
                "losses/ql_loss", "losses/nll_loss", "eval/episodic_return", "eval/episodic_return_std",
                "eval/normalized_score"):
        assert tag in scalars, tag
    assert [s for s, _ in scalars["losses/actor_loss"]] == [15, 20, 25, 30]  # the policy trains after pretraining only
    assert [s for s, _ in scalars["losses/bc_loss"]][:2] == [5, 10]

    # the same run in two halves: the resumed half must end bit-identical (RNG states, optimizers, counters)
    halves = tmp_path / "halves"
    halves.mkdir()
    run_script("dtql.py", *common, "--total-timesteps", "10", cwd=halves, env=ONE_THREAD)
    (half_dir,) = run_dirs(halves)
    proc = run_script("dtql.py", "--resume", str(half_dir / "checkpoint.pt"), "--total-timesteps", "20", cwd=halves,
                      env=ONE_THREAD)
    assert "resumed" in proc.stdout and len(run_dirs(halves)) == 1
    a = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    b = torch.load(half_dir / "checkpoint.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 30
    for name in ("bc_model", "actor", "critic", "critic_target"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), (name, key)
    assert [e["mean_return"] for e in a["eval"]] == [e["mean_return"] for e in b["eval"]]
    assert [s for s, _ in tensorboard_scalars(half_dir)["losses/actor_loss"]] == [15, 20, 25, 30]

    # --lr / --critic-lr given with --resume win over the lrs the optimizers saved (here lr decay is off)
    ckpt_path = half_dir / "checkpoint.pt"
    run_script("dtql.py", "--resume", str(ckpt_path), "--total-timesteps", "22", "--lr", "1e-3", "--critic-lr", "2e-4",
               "--no-compile", cwd=halves, env=ONE_THREAD)
    c = torch.load(ckpt_path, weights_only=False)
    assert c["global_step"] == 32 and c["args"]["lr"] == 1e-3 and c["args"]["critic_lr"] == 2e-4
    assert [c[f"{n}_optimizer"]["param_groups"][0]["lr"] for n in ("bc", "actor", "critic")] == [1e-3, 1e-3, 2e-4]

    # a resume with nothing left to do exits cleanly and keeps the summary (its SPS) ...
    summary = read_summary(half_dir)
    proc = run_script("dtql.py", "--resume", str(ckpt_path), "--no-compile", cwd=halves, env=ONE_THREAD)
    assert "done: 32 gradient steps" in proc.stdout and "eval  step" not in proc.stdout
    assert read_summary(half_dir) == summary and summary["sps"] > 0
    # ... unless the checkpoint has no evaluation yet: then it evaluates once and writes a summary without SPS
    c["eval"] = []
    torch.save(c, half_dir / "no_eval.pt")
    proc = run_script("dtql.py", "--resume", str(half_dir / "no_eval.pt"), "--no-compile", cwd=halves, env=ONE_THREAD)
    assert "eval  step         32" in proc.stdout and "done: 32 gradient steps" in proc.stdout
    summary = read_summary(half_dir)
    assert [e["step"] for e in summary["eval"]] == [32] and summary["sps"] is None
    assert summary["train_ms_per_step"] is None and summary["final_eval_return"] is not None

    assert_resume_rejects_bad_input("dtql.py", half_dir, halves, env=ONE_THREAD,
                                    extra=((ckpt_path, ["--dataset-id", "test/hopper/other-v0"], "--dataset-id"),))


def test_bandit_one_step_policy_picks_the_best_mode(tmp_path, minari_root):
    offline_data.make_bandit_dataset()
    # alpha 0.2: rewards here are <= 1 (D4RL Q values are in the hundreds), so the trust region needs a smaller weight
    run_script("dtql.py", "--dataset-id", "toy/multimodal-bandit-v0", "--hidden-dim", "64", "--lr", "3e-3",
               "--critic-lr", "3e-3", "--alpha", "0.2", "--lr-decay", "False", "--pretrain-steps", "300",
               "--total-timesteps", "500", "--eval-frequency", "500", "--eval-episodes", "50", "--log-frequency", "100",
               "--save-model", "--no-compile", cwd=tmp_path, env=ONE_THREAD)
    (run_dir,) = run_dirs(tmp_path)
    summary = read_summary(run_dir)
    # any mode but the best pays at most 0.6: a mean return above 0.7 needs most of the 50 actions on mode 0
    assert summary["final_eval_return"] > 0.7, summary["eval"]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    actor = dtql.Actor(1, 2, 1.0, 64)
    actor.load_state_dict(ckpt["actor"])
    with torch.no_grad():
        samples = actor.sample(torch.zeros(2000, 1)).numpy()
        mean_action = actor.deterministic(torch.zeros(1, 1)).numpy()
    modes = offline_data.bandit_mode_of(samples)
    assert (modes == 0).mean() > 0.9, np.bincount(modes + 1, minlength=5)
    assert offline_data.bandit_mode_of(mean_action)[0] == 0, mean_action


@pytest.mark.parametrize("flags,needles", [
    (["--dataset-id", "nowhere/missing-v0"], ["nowhere/missing-v0", "minari download"]),
    (["--batch-size", "0"], ["--batch-size", "positive"]),
])
def test_bad_input_exits_with_one_line(tmp_path, minari_root, flags, needles):
    proc = run_script("dtql.py", *TINY, *flags, "--no-compile", cwd=tmp_path, check=False, env={"HF_HUB_OFFLINE": "1", **ONE_THREAD})
    assert_one_line_error(proc, "dtql.py: error:", *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("changes,needle", [
    (dict(preset="hopper-huge-v9"), "--preset"), (dict(expectile=1.5), "--expectile"), (dict(num_envs=4), "--num-envs"),
    (dict(total_timesteps=-1), "--total-timesteps"), (dict(sigma_min=0.6), "--sigma-min"), (dict(alpha=-1.0), "--alpha"),
    (dict(resume="no/such/checkpoint.pt"), "no/such/checkpoint.pt"), (dict(time_dim=7), "--time-dim"),
    (dict(lr=float("nan")), "--lr"), (dict(lr=0.0), "--lr"), (dict(critic_lr=float("inf")), "--critic-lr"),
    (dict(alpha=float("inf")), "--alpha"), (dict(nll_weight=-0.5), "--nll-weight"), (dict(tau=float("nan")), "--tau"),
    (dict(gamma=0.0), "--gamma"), (dict(expectile=0.0), "--expectile"), (dict(sigma_min=0.0), "--sigma-min"),
    (dict(sigma_max=1e7), "--sigma-max"), (dict(sigma_data=100.0), "--sigma-data"), (dict(seed=-1), "--seed"),
    (dict(pretrain_steps=-1), "--pretrain"), (dict(eval_candidates=0), "--eval-candidates"),
    (dict(eval_episodes=0), "--eval-episodes"),
    (dict(checkpoint_frequency=0), "--checkpoint-frequency"), (dict(hidden_dim=0), "--hidden-dim"),
])
def test_check_args_rejects_bad_values(changes, needle):
    assert needle in one_line_exit(dtql.check_args, dtql.Args(**changes))


def test_check_args_accepts_the_common_flags_dtql_does_not_use():
    """--kernels and --diffusion-steps are read by nothing: any value passes (no power-of-two width as for Triton)."""
    dtql.check_args(dtql.Args(kernels="triton", hidden_dim=48, diffusion_steps=7))
    source = open(dtql.__file__).read()
    assert "import kernels" not in source and "args.kernels" not in source


def test_dict_observations_are_flattened_in_sorted_key_order():
    space = gym.spaces.Dict({"observation": gym.spaces.Box(-1, 1, (3,)), "desired_goal": gym.spaces.Box(-1, 1, (2,))})
    obs = {"observation": np.arange(6.0).reshape(2, 3), "desired_goal": np.array([[10.0, 11.0], [12.0, 13.0]])}
    np.testing.assert_array_equal(dtql.flatten_obs(obs, space), [[10, 11, 0, 1, 2], [12, 13, 3, 4, 5]])
    np.testing.assert_array_equal(dtql.flatten_obs(np.ones(4), gym.spaces.Box(-1, 1, (4,))), np.ones(4))
    # nested (Minari kitchen: goals are Dicts keyed by task): sorted at every level, whatever the obs dicts' order
    goal = gym.spaces.Dict({"microwave": gym.spaces.Box(-9, 9, (1,)), "kettle": gym.spaces.Box(-9, 9, (2,))})
    nested = gym.spaces.Dict({"observation": gym.spaces.Box(-9, 9, (2,)), "goal": goal})
    obs = {"observation": np.array([0.0, 1.0]), "goal": {"microwave": np.array([2.0]), "kettle": np.array([3.0, 4.0])}}
    np.testing.assert_array_equal(dtql.flatten_obs(obs, nested), [3, 4, 2, 0, 1])
    episode = {"observation": np.zeros((3, 2)), "goal": {"microwave": np.ones((3, 1)), "kettle": np.full((3, 2), 2.0)}}
    np.testing.assert_array_equal(dtql.flatten_obs(episode, nested), [[2, 2, 1, 0, 0]] * 3)  # [T+1] per leaf


# A toy env with Minari-kitchen-like nested Dict observations, actions in a box that is not [-1, 1], episodes of 3
# steps; its observation at step t is a known function of t. Registered with an entry point in this module.
def box(n: int) -> gym.spaces.Box:
    return gym.spaces.Box(-1e3, 1e3, (n,), np.float64)


NESTED_SPACE = gym.spaces.Dict({"observation": box(2),
                                "desired_goal": gym.spaces.Dict({"microwave": box(1), "kettle": box(2)}),
                                "achieved_goal": gym.spaces.Dict({"microwave": box(1), "kettle": box(2)})})
NESTED_ENV_ID = "DtqlNestedGoal-v0"


def nested_obs(t):
    """Observation(s) at step(s) t (scalar or [T]): leaves [2] / [1] or [T, 2] / [T, 1], in insertion order."""
    t = np.asarray(t, dtype=np.float64)[..., None]
    return {"observation": np.concatenate([t, t + 0.5], -1),
            "desired_goal": {"microwave": 10 + t, "kettle": np.concatenate([20 + t, 21 + t], -1)},
            "achieved_goal": {"microwave": 30 + t, "kettle": np.concatenate([40 + t, 41 + t], -1)}}


def nested_flat(t):
    """What flatten_obs must give: sorted keys at every level -> achieved (kettle, microwave), desired (...), obs."""
    t = np.asarray(t, dtype=np.float32)[..., None]
    return np.concatenate([40 + t, 41 + t, 30 + t, 20 + t, 21 + t, 10 + t, t, t + 0.5], -1)


class NestedGoalEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode=None):
        self.render_mode, self.observation_space, self.t = render_mode, NESTED_SPACE, 0
        self.action_space = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 4.0], np.float32))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return nested_obs(self.t), {}

    def step(self, action):
        self.t += 1
        return nested_obs(self.t), 1.0, self.t >= 3, False, {}

    def render(self):
        raise RuntimeError("no display here\nsecond line of the message")


if NESTED_ENV_ID not in gym.registry:
    gym.register(NESTED_ENV_ID, entry_point=f"{__name__}:NestedGoalEnv")


def make_nested_dataset(dataset_id: str = "toy/nested-goal-v0"):
    """Two episodes under MINARI_DATASETS_PATH: 3 steps ending in a termination, then 2 steps (obs from t = 100)
    ending in a truncation. Actions [5, 2] in the box [-2, 2] x [0, 4], rewards 0.5, 1.5, ..."""
    actions = np.array([[2.0, 0.0], [0.0, 2.0], [-1.0, 3.0], [-2.0, 4.0], [1.0, 1.0]], np.float32)
    rewards = np.arange(5) + 0.5
    episodes = [(np.arange(4), slice(0, 3), [0, 0, 1], [0, 0, 0]), (100 + np.arange(3), slice(3, 5), [0, 0], [0, 1])]
    buffers = [EpisodeBuffer(id=i, observations=nested_obs(t), actions=actions[rows], rewards=rewards[rows],
                             terminations=np.array(term, bool), truncations=np.array(trunc, bool))
               for i, (t, rows, term, trunc) in enumerate(episodes)]
    spec = gym.spec(NESTED_ENV_ID)
    return minari.create_dataset_from_buffers(dataset_id, buffers, env=spec, eval_env=spec, algorithm_name="by hand",
                                              author="diffusion-rl tests", author_email="tests@localhost",
                                              code_permalink="tests/test_dtql.py", ref_min_score=0.0, ref_max_score=1.0,
                                              description="nested Dict observations")


def test_dataset_tensors_shapes_bootstrap_cut_and_reward_tune(minari_root):
    dataset = make_nested_dataset()
    data = dtql.dataset_tensors(dataset, "no", torch.device("cpu"))
    assert {k: tuple(v.shape) for k, v in data.items()} == {"obs": (5, 8), "next_obs": (5, 8), "actions": (5, 2),
                                                            "rewards": (5, 1), "not_dones": (5, 1)}
    assert all(v.dtype == torch.float32 for v in data.values())
    # obs[:-1] -> obs[1:] per episode: the last transition of an episode keeps its own final obs, never the next
    # episode's first one
    steps = np.array([0, 1, 2, 100, 101])
    np.testing.assert_array_equal(data["obs"].numpy(), nested_flat(steps))
    np.testing.assert_array_equal(data["next_obs"].numpy(), nested_flat(steps + 1))
    # the termination (last step of episode 0) cuts the bootstrap, the truncation (last of episode 1) does not
    assert data["not_dones"][:, 0].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    # actions rescaled from [-2, 2] x [0, 4] to [-1, 1]^2
    np.testing.assert_allclose(data["actions"].numpy(), [[1, -1], [0, 0], [-0.5, 0.5], [-1, 1], [0.5, -0.5]])
    np.testing.assert_allclose(data["rewards"][:, 0].numpy(), [0.5, 1.5, 2.5, 3.5, 4.5])
    tuned = dtql.dataset_tensors(dataset, "iql_antmaze", torch.device("cpu"))  # antmaze: r - 1, nothing else changes
    np.testing.assert_allclose(tuned["rewards"][:, 0].numpy(), [-0.5, 0.5, 1.5, 2.5, 3.5])
    for key in ("obs", "next_obs", "actions", "not_dones"):
        assert torch.equal(tuned[key], data[key]), key


def test_antmaze_goal_steps_end_the_bootstrap_by_default_and_actions_are_clipped(minari_root):
    """D4RL's antmaze `terminals` (1 on every reward-1 step, so not_done = 0 there) for antmaze datasets by default;
    Minari's antmaze episodes never terminate. Counted on a dataset with 4 goal steps in 12 transitions."""
    marked, raw, goal_steps = offline_data.check_goal_terminals(dtql, "iql_antmaze")
    torch.testing.assert_close(marked["rewards"][:, 0], raw - 1.0)  # iql_antmaze: a goal step is worth 0, terminal
    ended = dtql.dataset_tensors(offline_data.make_goal_dataset("test/antmaze/goal-ended-v0", terminate_last=True),
                                 "no", torch.device("cpu"), goal_terminals=True)
    assert int((ended["not_dones"] == 0).sum()) == goal_steps + 1  # goal steps and the one real termination
    # actions are clipped to [-1, 1]: the NLL term's atanh(a / 1.001) would be NaN beyond the box
    torch.testing.assert_close(marked["actions"][0], torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(marked["actions"][1:], torch.tensor([[0.5, -0.5]]).expand(11, 2))


def test_nested_dict_observations_in_the_dataset_and_the_eval_env(minari_root):
    dataset = make_nested_dataset()
    dtql.check_spaces(dataset, "toy/nested-goal-v0")  # nested Dicts of flat Boxes pass
    data = dtql.dataset_tensors(dataset, "no", torch.device("cpu"))
    env = dtql.make_env(dataset, seed=0)()
    assert env.observation_space.shape == (8,)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, data["obs"][0].numpy())  # the same flattening as the dataset's
    obs, *_ = env.step(np.array([1.0, -1.0], np.float32))
    np.testing.assert_array_equal(obs, data["next_obs"][0].numpy())
    env.close()
    # a Dict leaf that is not a flat Box is still refused with one line
    square = gym.spaces.Box(0, 1, (2, 2))
    bad = types.SimpleNamespace(observation_space=gym.spaces.Dict({"a": gym.spaces.Dict({"b": square})}),
                                action_space=gym.spaces.Box(-1, 1, (2,)))
    assert one_line_exit(dtql.check_spaces, bad, "toy/bad-v0").startswith("dtql.py: error: toy/bad-v0")
    # as is an empty Dict, and an action dimension that cannot be rescaled (high == low: a division by zero)
    flat_dim = gym.spaces.Box(np.zeros(2), np.array([1.0, 0.0]), dtype=np.float64)
    for obs_space, act_space, needle in ((gym.spaces.Dict({}), box(2), "observation space"),
                                         (box(2), flat_dim, "high <= low")):
        bad = types.SimpleNamespace(observation_space=obs_space, action_space=act_space)
        assert needle in one_line_exit(dtql.check_spaces, bad, "toy/bad-v0")


def test_capture_video_checks_rendering_at_start(minari_root, monkeypatch):
    """check_video (run before the run directory exists): moviepy first, then one render of the eval env."""
    dataset = make_nested_dataset()
    monkeypatch.setitem(sys.modules, "moviepy", None)  # import moviepy raises ImportError
    assert "pip install moviepy" in one_line_exit(dtql.check_video, dataset)
    monkeypatch.setitem(sys.modules, "moviepy", types.ModuleType("moviepy"))
    message = one_line_exit(dtql.check_video, dataset)  # NestedGoalEnv.render raises a two-line error
    assert message.startswith("dtql.py: error: --capture-video") and "no display here" in message
    assert "MUJOCO_GL=egl" in message


def test_capture_video_without_moviepy_fails_before_the_run_directory(tmp_path, minari_root):
    offline_data.make_mujoco_dataset()
    assert_capture_video_needs_moviepy("dtql.py", *TINY, "--no-compile", cwd=tmp_path, env=ONE_THREAD)
