"""Tests for dacer.py: the VP schedule, the DSAC-T critic loss, backprop through the reverse chain, the actor step,
the batched Gaussian-mixture entropy and its NaN guard, an end-to-end smoke run with resume, a small learning run and
the error paths."""

import functools
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import gymnasium as gym
import numpy as np
import pytest
import torch

import dacer
import helpers
from helpers import (REPO, assert_capture_video_needs_moviepy, assert_one_line_error, assert_resume_rejects_bad_input,
                     read_summary, run_dirs, run_script, tensorboard_scalars)

# The machine is small and shared: one intra-op thread avoids oversubscription, which slows these tiny ops 10-100x.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

one_line_exit = functools.partial(helpers.one_line_exit, "dacer.py")  # fn, *args -> its one-line error


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_vp_schedule_values():
    betas = dacer.vp_beta_schedule(20, 0.1, 10.0)
    # beta_t = 1 - exp(-0.1/20 - 0.5 * 9.9 * (2t - 1) / 400), computed by hand for t = 1 and t = 20
    assert betas[0].item() == pytest.approx(1 - math.exp(-0.005 - 0.5 * 9.9 / 400), rel=1e-12)
    assert betas[-1].item() == pytest.approx(1 - math.exp(-0.005 - 0.5 * 9.9 * 39 / 400), rel=1e-12)
    # the values the reference sheet lists for the official schedule
    np.testing.assert_allclose(betas[[0, 1, 2, 18, 19]].numpy(), [0.017, 0.041, 0.065, 0.371, 0.386], atol=6e-4)
    schedule = dacer.DDPMSchedule(betas, torch.device("cpu"))
    abar = torch.cumprod(1 - betas, 0)
    assert abar[-1].item() == pytest.approx(6.4e-3, abs=5e-5)
    # abar_T has the closed form exp(-b_min - (b_max - b_min) / 2) = exp(-5.05)
    assert abar[-1].item() == pytest.approx(math.exp(-5.05), rel=1e-9)
    assert schedule.posterior_std[1].item() == pytest.approx(0.111, abs=5e-4)
    assert schedule.posterior_std[19].item() == pytest.approx(0.620, abs=5e-4)
    assert schedule.posterior_std[0].item() < 1e-9  # posterior variance 0 at t = 0 (clamped log, no noise there)


def test_dsac_critic_loss_on_hand_checked_batch():
    q_mean = torch.tensor([1.0, 2.0], requires_grad=True)
    q_std = torch.tensor([0.5, 1.0], requires_grad=True)
    y = torch.tensor([1.5, 1.0])
    y_sample = torch.tensor([10.0, 1.8])
    # first call: b starts at -1 -> the batch-mean std 0.75; the bound is 3b = 2.25, so sample 1 is clipped to
    # 1 + 2.25 = 3.25 and sample 2 stays 1.8.
    #   mean term: 1 * 0.5 / 0.35 = 1.428571...; 2 * (-1) / 1.1 = -1.818181...
    #   std term:  0.5 * ((1 - 3.25)^2 - 0.25) / (0.125 + 0.1) = 0.5 * 4.8125 / 0.225 = 10.694444...
    #              1.0 * ((2 - 1.8)^2 - 1) / 1.1 = -0.872727...
    #   loss = -(0.75^2 + 0.1) * mean(1.428571 + 10.694444, -1.818182 - 0.872727) = -0.6625 * 4.716053
    loss, b = dacer.dsac_critic_loss(q_mean, q_std, y, y_sample, torch.tensor(-1.0), tau=0.005)
    expected = -(0.75**2 + 0.1) * ((1 * 0.5 / 0.35 + 0.5 * ((1 - 3.25) ** 2 - 0.25) / 0.225)
                                   + (2 * -1 / 1.1 + 1.0 * (0.2**2 - 1) / 1.1)) / 2
    assert b.item() == pytest.approx(0.75)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(-0.6625 * 4.716053, rel=1e-5)
    loss.backward()
    # d/d mean_i = -(b^2 + 0.1) / 2 * (y_i - mean_i) / (std_i^2 + 0.1): the targets are stop-gradient
    np.testing.assert_allclose(q_mean.grad.numpy(), [-0.6625 / 2 * 0.5 / 0.35, -0.6625 / 2 * -1 / 1.1], rtol=1e-5)
    # d/d std_i = -(b^2 + 0.1) / 2 * ((mean_i - y_b,i)^2 - std_i^2) / (std_i^3 + 0.1)
    np.testing.assert_allclose(q_std.grad.numpy(), [-0.6625 / 2 * 4.8125 / 0.225, -0.6625 / 2 * -0.96 / 1.1],
                               rtol=1e-5)
    # second call: b moves by tau towards the new batch-mean std (1.75 here) and the bound follows it
    loss2, b2 = dacer.dsac_critic_loss(q_mean, q_std + 1.0, y, y_sample, b, tau=0.005)
    assert b2.item() == pytest.approx(0.005 * 1.75 + 0.995 * 0.75)


def tiny_denoiser(obs_dim=3, act_dim=2, hidden=16, steps=20):
    torch.manual_seed(0)
    denoiser = dacer.Denoiser(obs_dim, act_dim, hidden, 16, steps).double()
    schedule = dacer.DDPMSchedule(dacer.vp_beta_schedule(steps, 0.1, 10.0), torch.device("cpu"))
    for name in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                 "posterior_mean_coef2", "posterior_std"):
        setattr(schedule, name, getattr(schedule, name).double())
    return denoiser, schedule


def test_gradients_reach_first_layer_through_all_steps():
    denoiser, schedule = tiny_denoiser()
    n = 256
    obs = torch.randn(n, 3, dtype=torch.float64)
    x_T = torch.randn(n, 2, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(20, n, 2, dtype=torch.float64)
    captured = {}

    def keep_temb(module, inputs, out):  # the [T, E] time embeddings reverse_chain computes once per chain
        if out.requires_grad:
            out.retain_grad()
            captured["temb"] = out

    denoiser.time_mlp.register_forward_hook(keep_temb)
    out = dacer.reverse_chain(denoiser, schedule, obs, x_T, noise)
    loss = (out * torch.linspace(-1, 1, n, dtype=torch.float64)[:, None]).sum()
    loss.backward()
    # temb[t] enters the first layer only at step t, so a non-zero gradient row t means the gradient reached the
    # first layer's input at step t; every one of the 20 steps must contribute.
    temb_grad = captured["temb"].grad  # [T, E]
    assert temb_grad.shape == (20, 16)
    assert (temb_grad.abs().sum(-1) > 0).all(), temb_grad.abs().sum(-1)
    assert x_T.grad.abs().sum() > 0  # and the chain is not cut anywhere between x_T and the action
    first_layer = denoiser.net[0].weight
    assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0
    # the autograd gradient of one first-layer weight equals a central finite difference of the whole chain
    i, j, h = 3, 4, 1e-6
    with torch.no_grad():
        first_layer[i, j] += h
        plus = (dacer.reverse_chain(denoiser, schedule, obs, x_T, noise)
                * torch.linspace(-1, 1, n, dtype=torch.float64)[:, None]).sum()
        first_layer[i, j] -= 2 * h
        minus = (dacer.reverse_chain(denoiser, schedule, obs, x_T, noise)
                 * torch.linspace(-1, 1, n, dtype=torch.float64)[:, None]).sum()
        first_layer[i, j] += h
    assert first_layer.grad[i, j].item() == pytest.approx(((plus - minus) / (2 * h)).item(), rel=1e-4, abs=1e-8)


def test_sample_actions_noise_and_clip():
    denoiser, schedule = tiny_denoiser()
    denoiser.float()
    schedule = dacer.DDPMSchedule(dacer.vp_beta_schedule(20, 0.1, 10.0), torch.device("cpu"))
    obs = torch.randn(64, 3)
    torch.manual_seed(1)
    clean = dacer.sample_actions(denoiser, schedule, obs, 0.0, 1.0)
    torch.manual_seed(1)
    noisy = dacer.sample_actions(denoiser, schedule, obs, 5.0, 1.0)  # same chain noise, huge exploration noise
    assert clean.shape == (64, 2) and clean.abs().max() <= 1.0
    assert noisy.abs().max() <= 1.0 and (noisy.abs() == 1.0).float().mean() > 0.5  # clipped after the noise
    assert not torch.equal(clean, noisy)


def sample_mixture(weights, means, covs, batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(weights, batch * n, replacement=True, generator=g).view(batch, n)
    z = torch.randn(batch, n, means.shape[-1], generator=g, dtype=torch.float64)
    return means[comp] + (torch.linalg.cholesky(covs)[comp] @ z[..., None]).squeeze(-1)


def mixture_log_prob(x, weights, means, covs):
    """log p(x) of one known mixture: x [M, D] -> [M]."""
    return torch.logsumexp(dacer.gaussian_log_probs(x[None], means[None], covs[None])[0] + weights.log()[:, None], 0)


def known_mixture(dim=3, separation=6.0):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, dim, dim, generator=g, dtype=torch.float64) * 0.4
    covs = a @ a.transpose(-1, -2) + 0.05 * torch.eye(dim, dtype=torch.float64)
    means = torch.zeros(3, dim, dtype=torch.float64)
    means[0, 0], means[1, 0], means[2, 1] = -separation, separation, separation
    return torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), means, covs


def test_gmm_recovers_known_mixture_and_entropy():
    weights, means, covs = known_mixture()
    x = sample_mixture(weights, means, covs, batch=8, n=2000, seed=0)  # 8 states, same mixture
    torch.manual_seed(0)
    fit_w, fit_m, fit_c = dacer.fit_gmm(x, 3, 100)
    true_entropy = dacer.gmm_entropy(weights[None], covs[None]).item()
    # Monte-Carlo entropy -E[log p(x)] of the known mixture; well-separated, so the official formula matches it
    mc = -mixture_log_prob(sample_mixture(weights, means, covs, 1, 200_000, seed=1)[0], weights, means, covs).mean()
    assert true_entropy == pytest.approx(mc.item(), abs=0.02)
    recovered = 0
    for b in range(8):
        order = torch.cdist(means, fit_m[b]).argmin(1)  # match fitted components to the true ones
        if len(set(order.tolist())) == 3 and torch.allclose(fit_w[b, order], weights, atol=0.04) \
                and torch.allclose(fit_m[b, order], means, atol=0.15) and torch.allclose(fit_c[b, order], covs, atol=0.1):
            recovered += 1
    assert recovered >= 7, recovered  # EM from one k-means start may land in a local optimum now and then
    estimates = dacer.gmm_entropy(fit_w, fit_c)
    assert estimates.median().item() == pytest.approx(mc.item(), abs=0.05)
    # the script's estimator: 200 samples per state (as in DACER), mean over 64 states, float32 in and out
    x200 = sample_mixture(weights, means, covs, batch=64, n=200, seed=2).float()
    torch.manual_seed(0)
    estimate = dacer.estimate_entropy(x200, 3, 100, torch.tensor(float("nan")))
    assert estimate.dtype == torch.float32 and estimate.shape == ()
    assert estimate.item() == pytest.approx(mc.item(), abs=0.15)


def test_gmm_entropy_formula_single_gaussian_and_bound():
    # one component (the other two with ~0 weight contribute nothing): the Gaussian entropy 0.5 log((2 pi e)^D |C|)
    cov = torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=torch.float64)
    gauss = 0.5 * math.log((2 * math.pi * math.e) ** 2 * torch.linalg.det(cov).item())
    assert dacer.gmm_entropy(torch.tensor([[1.0]], dtype=torch.float64), cov[None, None]).item() == pytest.approx(gauss)
    # overlapping components: the formula is an upper bound of the true (Monte-Carlo) mixture entropy
    weights, means, covs = known_mixture(dim=2, separation=0.3)
    mc = -mixture_log_prob(sample_mixture(weights, means, covs, 1, 100_000, seed=3)[0], weights, means, covs).mean()
    assert dacer.gmm_entropy(weights[None], covs[None]).item() > mc.item() + 0.1
    # clipped actions: many identical samples give a finite (very negative) entropy, not NaN
    x = torch.ones(2, 200, 2, dtype=torch.float32)
    x[1, :100] = -1.0
    assert torch.isfinite(dacer.estimate_entropy(x, 3, 20, torch.tensor(float("nan"))))


def test_entropy_leaves_out_failed_fits_and_keeps_the_previous_estimate(monkeypatch):
    """Without reg_covar, all-identical samples give a zero covariance: cholesky_ex fails (without raising) and that
    state's entropy is NaN. The estimate must average the other states, and keep the previous one if all failed."""
    fit_without_reg = functools.partial(dacer.fit_gmm, reg_covar=0.0)
    monkeypatch.setattr(dacer, "fit_gmm", fit_without_reg)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 100, 2, generator=g)
    x[0], x[2] = 0.3, -1.0  # degenerate states: every sample the same (e.g. all clipped)
    torch.manual_seed(0)
    weights, _, covs = fit_without_reg(x.double(), 3, 10)
    per_state = dacer.gmm_entropy(weights, covs)
    assert per_state[[0, 2]].isnan().all() and per_state[[1, 3]].isfinite().all()  # the failure is real
    torch.manual_seed(0)
    estimate = dacer.estimate_entropy(x, 3, 10, torch.tensor(5.0))
    assert estimate.dtype == torch.float32 and estimate.item() == pytest.approx(per_state[[1, 3]].mean().item())
    # every state degenerate: the previous estimate comes back unchanged, so log alpha never sees a NaN
    assert dacer.estimate_entropy(x[[0, 2]], 3, 10, torch.tensor(5.0)).item() == 5.0


def test_init_matches_haiku_per_layer_std():
    """hk.Linear's default init is TruncatedNormal(1/sqrt(fan_in)) = stddev * truncated_normal(-2, 2) with no rescale:
    every weight lies within +-2/sqrt(fan_in) and has std 0.8796/sqrt(fan_in) (not 1/sqrt(fan_in)); biases are 0."""
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)  # standard normal density at 2
    mass = math.erf(2 / math.sqrt(2))  # P(|z| < 2)
    truncated_std = math.sqrt(1 - 4 * phi2 / mass)
    assert truncated_std == pytest.approx(0.8796, abs=1e-4)
    torch.manual_seed(0)
    weights = {}  # layer name -> all draws of that layer's weights, flattened
    for _ in range(8):
        nets = {"actor": dacer.Denoiser(17, 6, 256, 16, 20), "qf": dacer.QNetwork(17, 6, 256)}
        for net_name, net in nets.items():
            for name, module in net.named_modules():
                if isinstance(module, torch.nn.Linear):
                    assert (module.bias == 0).all(), (net_name, name)
                    weights.setdefault(f"{net_name}.{name}", []).append(module.weight.detach().flatten().double())
    assert len(weights) == 6 + 4  # the denoiser's time MLP (2) and main MLP (4), the critic's MLP (4)
    for name, draws in weights.items():
        w = torch.cat(draws)
        fan_in = {"actor.time_mlp.0": 16, "actor.time_mlp.2": 32, "actor.net.0": 17 + 6 + 16, "qf.net.0": 17 + 6}.get(
            name, 256)  # every other layer takes a 256-wide hidden layer
        scaled = w * math.sqrt(fan_in)
        assert scaled.abs().max() <= 2.0 + 1e-6, name  # truncated at +-2 std of the underlying normal
        # 4 standard errors of a std estimate from n draws (the truncated normal's kurtosis is below the normal's 3)
        tolerance = 4 * truncated_std / math.sqrt(2 * w.numel())
        assert scaled.std().item() == pytest.approx(truncated_std, abs=tolerance), name
        assert abs(scaled.mean().item()) < 4 * truncated_std / math.sqrt(w.numel()), name


def test_actor_step_leaves_the_critics_gradients_alone():
    """update_actor's backward reaches only the denoiser: its gradients equal a full backward's, and the critics'
    .grad (here a sentinel the critic step would own) is not touched."""
    denoiser, schedule = tiny_denoiser()
    qf1, qf2 = dacer.QNetwork(3, 2, 16).double(), dacer.QNetwork(3, 2, 16).double()
    obs, x, noise = (torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64),
                     torch.randn(20, 32, 2, dtype=torch.float64))
    actions = dacer.reverse_chain(denoiser, schedule, obs, x, noise)
    full_loss = -torch.min(qf1(obs, actions)[0], qf2(obs, actions)[0]).mean()
    full_loss.backward()  # the plain backward: fills the critics' gradients too
    expected = [p.grad.clone() for p in denoiser.parameters()]
    for p in [*qf1.parameters(), *qf2.parameters()]:
        p.grad = torch.full_like(p, 7.0)
    optimizer = torch.optim.SGD(denoiser.parameters(), lr=0.0)
    actions = dacer.reverse_chain(denoiser, schedule, obs, x, noise)  # the same actions, a fresh graph
    loss = dacer.update_actor(denoiser, optimizer, qf1, qf2, obs, actions)
    assert loss.item() == full_loss.item() and not loss.requires_grad
    for p, grad in zip(denoiser.parameters(), expected):
        torch.testing.assert_close(p.grad, grad, rtol=1e-12, atol=0)
    assert all((p.grad == 7.0).all() for p in [*qf1.parameters(), *qf2.parameters()])


SMOKE = ["--env-id", "Pendulum-v1", "--max-episode-steps", "20", "--num-envs", "2", "--learning-starts", "40",
         "--batch-size", "16", "--hidden-dim", "32", "--diffusion-steps", "5", "--alpha-frequency", "5",
         "--entropy-samples", "8", "--em-iterations", "5", "--eval-frequency", "60", "--eval-episodes", "2",
         "--log-frequency", "20", "--save-model", "--checkpoint-frequency", "60"]


def test_smoke_run_summary_tensorboard_and_resume(tmp_path):
    run_script("dacer.py", *SMOKE, "--total-timesteps", "120", cwd=tmp_path, env=ONE_THREAD)
    (run_dir,) = run_dirs(tmp_path)
    summary = read_summary(run_dir)
    assert summary["global_step"] == 120 and [e["step"] for e in summary["eval"]] == [60, 120]
    assert summary["args"]["noise_scale"] == 0.1 and summary["args"]["learning_starts"] == 40  # presets resolved
    for key in ("final_eval_return", "best_eval_return", "sps", "wall_seconds"):
        assert np.isfinite(summary[key])
    scalars = tensorboard_scalars(run_dir)
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/qf1_loss", "losses/qf2_loss",
                "losses/qf_loss", "losses/qf1_values", "losses/actor_loss", "losses/alpha", "losses/alpha_loss",
                "losses/entropy", "losses/qf1_std", "losses/mean_q1_std", "eval/episodic_return"):
        assert tag in scalars, (tag, sorted(scalars))
    # 20-step episodes on 2 envs: 120 steps end 6 episodes, logged with their length
    assert [v for _, v in scalars["charts/episodic_length"]] == [20.0] * 6
    # alpha moved (updates every 5 gradient steps from ln 3)
    alphas = [v for _, v in scalars["losses/alpha"]]
    assert alphas[0] == pytest.approx(3.0) and alphas[-1] != pytest.approx(3.0)

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["global_step"] == 120 and ckpt["rb"]["size"] == 120 and float(ckpt["mean_q1_std"]) > 0
    # Row k holds env k % 2 at vector step k // 2: its next_obs is the next row's obs except where an episode was
    # truncated (every 20 steps), where it is the true final obs, not the reset obs; truncations store done = 0.
    obs, next_obs, _, _, dones = ckpt["rb"]["data"]
    continues = (next_obs[:-2] == obs[2:]).all(1)
    ends = torch.arange(len(obs) - 2) // 2 % 20 == 19
    assert torch.equal(~continues, ends) and ends.sum() == 4 and dones.sum() == 0  # steps 20 and 40, two envs

    assert_resume_rejects_bad_input("dacer.py", run_dir, tmp_path, env=ONE_THREAD)
    proc = run_script("dacer.py", "--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "160",
                      cwd=tmp_path, env=ONE_THREAD)
    assert "resumed" in proc.stdout and "at step 120" in proc.stdout
    assert run_dirs(tmp_path) == [run_dir]  # continues in the same run directory
    summary = read_summary(run_dir)
    assert summary["global_step"] == 160 and [e["step"] for e in summary["eval"]] == [60, 120, 160]
    ckpt2 = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt2["update_step"] == ckpt["update_step"] + 20 and ckpt2["rb"]["size"] == 160

    # resuming a finished run has nothing to do: it reports the last evaluation and leaves summary.json alone
    proc = run_script("dacer.py", "--resume", str(run_dir / "checkpoint.pt"), cwd=tmp_path, env=ONE_THREAD)
    assert "done: 160 env steps" in proc.stdout and "eval  step" not in proc.stdout
    assert read_summary(run_dir) == summary


def test_learns_pendulum(tmp_path):
    # Reduced settings: one env (UTD 1), small nets, 5 denoising steps, lr 1e-3, a policy/target update every step.
    # A random or untrained policy scores about -1200..-1700 here; the run reached -168 at 2000 steps when tuned.
    run_script("dacer.py", "--env-id", "Pendulum-v1", "--num-envs", "1", "--total-timesteps", "2000",
               "--learning-starts", "300", "--batch-size", "64", "--hidden-dim", "64", "--diffusion-steps", "5",
               "--alpha-frequency", "500", "--entropy-samples", "32", "--eval-frequency", "2000",
               "--eval-episodes", "4", "--log-frequency", "500", "--q-lr", "1e-3", "--policy-lr", "1e-3",
               "--policy-frequency", "1", "--tau", "0.01", cwd=tmp_path, env=ONE_THREAD)
    summary = read_summary(run_dirs(tmp_path)[0])
    assert [e["step"] for e in summary["eval"]] == [2000]
    assert summary["final_eval_return"] > -700, summary["eval"]


@pytest.mark.parametrize("flags, needles", [
    (["--env-id", "NoSuchEnv-v0"], ["cannot make env", "NoSuchEnv-v0"]),
    (["--env-id", "CartPole-v1"], ["Discrete", "continuous Box"]),
    (["--env-id", "Pendulum-v1", "--kernels", "triton", "--hidden-dim", "48"], ["--hidden-dim", "power of two"]),
])
def test_error_paths(tmp_path, flags, needles):
    proc = run_script("dacer.py", *flags, cwd=tmp_path, check=False, env=ONE_THREAD, timeout=120)
    assert_one_line_error(proc, "dacer.py: error", *needles)


@pytest.mark.parametrize("overrides, needle", [
    ({"num_envs": 0}, "--num-envs must be positive"),
    ({"noise_scale": -0.1}, "--noise-scale must be positive"),
    ({"hidden_dim": 0}, "--hidden-dim must be positive"),
    ({"entropy_samples": 3}, "--entropy-samples must exceed --gmm-components=3"),
    ({"vp_beta_min": 5.0, "vp_beta_max": 1.0}, "--vp-beta-min and --vp-beta-max"),
    ({"learning_starts": -1}, "--learning-starts must be in"),
    ({"time_dim": 15}, "--time-dim must be an even number"),
    ({"resume": "no/such/checkpoint.pt"}, "--resume: no checkpoint"),
    ({"q_lr": -1.0}, "--q-lr must be positive"),
    ({"policy_lr": 0.0}, "--policy-lr must be positive"),
    ({"alpha_lr": 0.0}, "--alpha-lr must be positive"),
    ({"init_noise_scale": 0.0}, "--init-noise-scale must be positive"),
    ({"init_noise_scale": 1e3}, "--init-noise-scale must be at most 100"),
    ({"em_iterations": 0}, "--em-iterations must be positive"),
    ({"gmm_components": 0}, "--gmm-components must be positive"),
    ({"alpha_frequency": 0}, "--alpha-frequency must be positive"),
    ({"reward_scale": float("nan")}, "--reward-scale must be a finite number"),
    ({"target_entropy_scale": float("-inf")}, "--target-entropy-scale must be a finite number"),
    ({"seed": -1}, "--seed must be in [0, 2**32)"),
    ({"vp_beta_max": 1e3}, "0 <= min < max <= 100"),
    ({"vp_beta_min": 0.0, "vp_beta_max": 1e-20}, "give a beta_t that rounds to 0 or 1"),  # beta_1 = 0: 0/0
    ({"diffusion_steps": 1, "vp_beta_min": 80.0, "vp_beta_max": 99.0}, "rounds to 0 or 1"),  # beta_1 = 1: 1/0
])
def test_bad_flag_values(overrides, needle):
    assert needle in one_line_exit(dacer.check_args, dacer.Args(**overrides))


def test_default_and_extreme_valid_flags_pass():
    dacer.check_args(dacer.Args())  # the official defaults, presets unresolved (None)
    for overrides in ({"diffusion_steps": 1, "vp_beta_min": 0.0, "vp_beta_max": 70.0},
                      {"diffusion_steps": 10_000, "vp_beta_min": 0.0, "vp_beta_max": 1e-3},
                      {"init_noise_scale": 100.0}):
        args = dacer.Args(**overrides)
        dacer.check_args(args)
        schedule = dacer.DDPMSchedule(dacer.vp_beta_schedule(args.diffusion_steps, args.vp_beta_min,
                                                             args.vp_beta_max), torch.device("cpu"))
        for name in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                     "posterior_mean_coef2", "posterior_std"):
            assert torch.isfinite(getattr(schedule, name)).all(), (overrides, name)


class MatrixActionEnv(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (3,))
    action_space = gym.spaces.Box(-1.0, 1.0, (2, 2))


def test_env_with_matrix_actions_is_one_line():
    gym.register("DacerTestMatrixActions-v0", entry_point=MatrixActionEnv)
    try:
        message = one_line_exit(dacer.check_env, "DacerTestMatrixActions-v0")
    finally:
        gym.registry.pop("DacerTestMatrixActions-v0")
    assert "actions of shape (2, 2)" in message and "1-D Box" in message


def test_resume_shape_check_compares_resolved_presets():
    saved = asdict(dacer.resolve_presets(dacer.Args(env_id="Hopper-v5")))  # checkpoints hold resolved flags
    assert saved["hidden_dim"] == 256
    dacer.check_resume_args(dacer.resolve_presets(dacer.Args(env_id="Hopper-v5")), saved)  # None -> 256: same
    dacer.check_resume_args(dacer.resolve_presets(dacer.Args(**{**saved, "total_timesteps": 10})), saved)
    for overrides, needle in (({"hidden_dim": 512}, "--hidden-dim 512 differs from the checkpoint's 256"),
                              ({"diffusion_steps": 10}, "--diffusion-steps 10"), ({"buffer_size": 10}, "--buffer-size"),
                              ({"env_id": "Humanoid-v5"}, "--env-id Humanoid-v5")):
        message = one_line_exit(dacer.check_resume_args, dacer.resolve_presets(dacer.Args(**{**saved, **overrides})),
                                saved)
        assert message.startswith("dacer.py: error: --resume: ") and needle in message, message


def test_resolve_backend_width_check():
    cpu = torch.device("cpu")
    assert ("--kernels triton needs --hidden-dim a power of two >= 16, got 48"
            in one_line_exit(dacer.resolve_backend, "triton", cpu, 48))
    assert dacer.resolve_backend("auto", cpu, 48) == "torch" and dacer.resolve_backend("torch", cpu, 8) == "torch"


def test_capture_video_without_moviepy_fails_at_start(tmp_path):
    assert_capture_video_needs_moviepy("dacer.py", "--env-id", "Pendulum-v1", cwd=tmp_path, env=ONE_THREAD)


def test_presets_follow_env_id():
    humanoid = dacer.resolve_presets(dacer.Args(env_id="Humanoid-v5"))
    assert (humanoid.hidden_dim, humanoid.learning_starts, humanoid.noise_scale) == (512, 200_000, 0.15)
    cheetah = dacer.resolve_presets(dacer.Args(env_id="HalfCheetah-v5"))
    assert (cheetah.hidden_dim, cheetah.learning_starts, cheetah.noise_scale) == (256, 30_000, 0.15)
    hopper = dacer.resolve_presets(dacer.Args(env_id="Hopper-v5"))
    assert (hopper.hidden_dim, hopper.learning_starts, hopper.noise_scale) == (256, 30_000, 0.1)
    overridden = dacer.resolve_presets(dacer.Args(env_id="Humanoid-v5", hidden_dim=64, noise_scale=0.3,
                                                  learning_starts=10))
    assert (overridden.hidden_dim, overridden.learning_starts, overridden.noise_scale) == (64, 10, 0.3)


def test_kernels_triton_without_kernels_package(tmp_path):
    shutil.copy(REPO / "dacer.py", tmp_path / "dacer.py")  # the script copied alone, no kernels/ next to it
    proc = subprocess.run([sys.executable, str(tmp_path / "dacer.py"), "--env-id", "Pendulum-v1", "--kernels", "triton"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, **ONE_THREAD})
    assert_one_line_error(proc, "dacer.py: error", "--kernels triton", "--kernels torch")


def test_triton_reverse_chain_matches_torch_with_gradients():
    torch.manual_seed(0)
    denoiser = dacer.Denoiser(3, 2, 16, 16, 20)
    schedule = dacer.DDPMSchedule(dacer.vp_beta_schedule(20, 0.1, 10.0), torch.device("cpu"))
    obs, x, noise, weights = torch.randn(8, 3), torch.randn(8, 2), torch.randn(20, 8, 2), torch.randn(8, 2)
    results = {}
    for backend in ("torch", "triton"):  # --kernels triton routes the policy loss through kernels.reverse_chain
        denoiser.zero_grad()
        out = dacer.reverse_chain(denoiser, schedule, obs, x, noise, backend)
        (out * weights).sum().backward()
        results[backend] = out.detach(), [p.grad.clone() for p in denoiser.parameters()]
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-5, rtol=1e-4)
    for name, (p, grad_triton, grad_torch) in zip([n for n, _ in denoiser.named_parameters()],
                                                   zip(denoiser.parameters(), results["triton"][1], results["torch"][1])):
        assert grad_torch.abs().sum() > 0, name
        torch.testing.assert_close(grad_triton, grad_torch, atol=1e-5, rtol=1e-4, msg=name)


def test_smoke_run_with_triton_kernels_and_terminations(tmp_path):
    # a few updates end to end through kernels.reverse_chain (forward for acting/targets/entropy, backward for the
    # actor), on InvertedPendulum-v5, which terminates within ~10 random steps
    run_script("dacer.py", "--env-id", "InvertedPendulum-v5", "--max-episode-steps", "20", "--num-envs", "2",
               "--total-timesteps", "46", "--learning-starts", "40", "--batch-size", "8", "--hidden-dim", "16",
               "--diffusion-steps", "5", "--alpha-frequency", "2", "--entropy-samples", "4", "--em-iterations", "5",
               "--eval-frequency", "1000", "--eval-episodes", "1", "--kernels", "triton", "--save-model",
               cwd=tmp_path, env=ONE_THREAD)
    (run_dir,) = run_dirs(tmp_path)
    summary = read_summary(run_dir)
    assert summary["kernels"] == "triton" and summary["global_step"] == 46 and np.isfinite(summary["final_eval_return"])
    # terminated rows store done = 1 and the terminal obs (next_obs differs from the reset obs in the next row)
    obs, next_obs, _, _, dones = torch.load(run_dir / "checkpoint.pt", weights_only=False)["rb"]["data"]
    ended = ~(next_obs[:-2] == obs[2:]).all(1)
    assert dones.sum() >= 4 and (ended | ~dones[:-2].bool()).all()
    assert (next_obs[dones.bool(), 1].abs() > 0.2).all()  # the pole angle that terminated it, not a reset state
