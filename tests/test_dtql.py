"""dtql.py: EDM pieces, the trust-region and IQL losses, the policy, presets, end-to-end runs with resume, the
multimodal bandit and the error paths."""

import math

import gymnasium as gym
import numpy as np
import offline_data
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_line_error, read_summary, run_dirs, run_script, tensorboard_scalars

import dtql

# Small nets and batches: the scripts' code paths, at a size a 2-core CPU runs in seconds. One intra-op thread: these
# nets are too small to gain from more, and a busy machine makes oversubscribed threads many times slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TINY = ["--dataset-id", "test/hopper/random-v0", "--batch-size", "32", "--hidden-dim", "32", "--eval-episodes", "2",
        "--eval-candidates", "16", "--log-frequency", "5"]


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
])
def test_check_args_rejects_bad_values(changes, needle):
    with pytest.raises(SystemExit) as exc:
        dtql.check_args(dtql.Args(**changes))
    assert str(exc.value).startswith("dtql.py: error:") and needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_dict_observations_are_flattened_in_sorted_key_order():
    space = gym.spaces.Dict({"observation": gym.spaces.Box(-1, 1, (3,)), "desired_goal": gym.spaces.Box(-1, 1, (2,))})
    obs = {"observation": np.arange(6.0).reshape(2, 3), "desired_goal": np.array([[10.0, 11.0], [12.0, 13.0]])}
    np.testing.assert_array_equal(dtql.flatten_obs(obs, space), [[10, 11, 0, 1, 2], [12, 13, 3, 4, 5]])
    np.testing.assert_array_equal(dtql.flatten_obs(np.ones(4), gym.spaces.Box(-1, 1, (4,))), np.ones(4))
