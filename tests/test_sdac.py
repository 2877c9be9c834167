"""sdac.py: schedule constants, sampler, loss, end-to-end runs, resume, error paths and a learning check."""

import math

import numpy as np
import pytest
import torch
from helpers import (assert_capture_video_needs_moviepy, assert_one_line_error, assert_resume_rejects_bad_input,
                     read_summary, run_dirs, run_script, tensorboard_scalars,
                     textbook_reverse_chain)

import sdac

TINY = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--batch-size", "16", "--learning-starts", "64",
        "--num-particles", "4", "--num-reverse-samples", "8", "--diffusion-steps", "5", "--hidden-dim", "32",
        "--eval-episodes", "2", "--max-episode-steps", "40", "--log-frequency", "50"]


def test_linear_schedule_matches_official_constants():
    betas = sdac.linear_beta_schedule(20, 0.8)
    assert betas[0].item() == pytest.approx(8e-5)
    assert betas[-1].item() == pytest.approx(0.7992)
    assert betas[1].item() == pytest.approx(0.8 * (1e-4 + (0.999 - 1e-4) / 19))
    sched = sdac.DDPMSchedule(betas, torch.device("cpu"))
    # sqrt(abar_t) as listed in the reference sheet (SDAC §1.4), rounded to 3 decimals there.
    expected = [1.000, 0.979, 0.937, 0.875, 0.798, 0.709, 0.613, 0.515, 0.420, 0.331, 0.252, 0.185, 0.130, 0.087,
                0.056, 0.034, 0.020, 0.010, 0.005, 0.002]
    np.testing.assert_allclose(sched.sqrt_alphas_cumprod.numpy(), expected, atol=1.5e-3)
    assert sched.sqrt_alphas_cumprod[-1].item() ** 2 == pytest.approx(5.3e-6, rel=0.05)
    # DDPM posterior: c1 + c2 * sqrt(alpha_t) ... at t = 0 the posterior collapses onto x0 (c1 = 1, c2 = 0).
    assert sched.posterior_mean_coef1[0].item() == pytest.approx(1.0)
    assert sched.posterior_mean_coef2[0].item() == pytest.approx(0.0, abs=1e-7)


def test_sinusoidal_embedding_is_scaled():
    emb = sdac.sinusoidal_embedding(torch.tensor([0, 3]), 16)
    assert emb.shape == (2, 16)
    np.testing.assert_allclose(emb[0].numpy(), [0.0] * 8 + [0.25] * 8)
    assert emb[1, 0].item() == pytest.approx(math.sin(3.0) / 4)
    assert emb[1, 1].item() == pytest.approx(math.sin(3.0 * 10000 ** (-1 / 8)) / 4)


def make_denoiser(obs_dim=3, act_dim=2, steps=5, seed=0):
    torch.manual_seed(seed)
    return sdac.Denoiser(obs_dim, act_dim, hidden_dim=32, time_dim=16, diffusion_steps=steps)


def test_reverse_chain_equals_textbook_loop_and_ignores_last_step_noise():
    denoiser = make_denoiser()
    sched = sdac.DDPMSchedule(sdac.linear_beta_schedule(5, 0.8), torch.device("cpu"))
    obs, x, noise = torch.randn(7, 3), 0.5 * torch.randn(7, 2), torch.randn(5, 7, 2)
    with torch.no_grad():
        out = sdac.reverse_chain(denoiser, sched, obs, x, noise)
        torch.testing.assert_close(out, textbook_reverse_chain(lambda x_t, t: denoiser(obs, x_t, t), sched, x, noise))
        noise_last = noise.clone()
        noise_last[0] += 100.0  # noise[0] would be added at t = 0, where DDPM adds none
        torch.testing.assert_close(sdac.reverse_chain(denoiser, sched, obs, x, noise_last), out)
        noise_mid = noise.clone()
        noise_mid[1] += 1.0
        assert not torch.allclose(sdac.reverse_chain(denoiser, sched, obs, x, noise_mid), out)


def test_single_step_clips_x0_hat():
    """T = 1 and a zero network: x_0 = clip(x_T / sqrt(abar_0), -1, 1) exactly (c1 = 1, c2 = 0)."""
    denoiser = make_denoiser(steps=1)
    for p in denoiser.net.parameters():
        torch.nn.init.zeros_(p)
    sched = sdac.DDPMSchedule(torch.tensor([0.36]), torch.device("cpu"))
    x = torch.tensor([[0.4, -0.1], [3.0, -5.0]])
    with torch.no_grad():
        out = sdac.reverse_chain(denoiser, sched, torch.zeros(2, 3), x, torch.randn(1, 2, 2))
    torch.testing.assert_close(out, torch.tensor([[0.5, -0.125], [1.0, -1.0]]))


def test_sample_actions_keeps_best_particle_per_state():
    denoiser = make_denoiser()
    sched = sdac.DDPMSchedule(sdac.linear_beta_schedule(5, 0.8), torch.device("cpu"))
    target = torch.tensor([0.3, -0.2])

    def q(obs, a):  # prefers actions close to `target`
        return -((a - target) ** 2).sum(-1)

    obs = torch.randn(6, 3)
    torch.manual_seed(123)
    best = sdac.sample_actions(denoiser, q, q, sched, obs, num_particles=10, init_noise_scale=0.5)
    assert best.shape == (6, 2) and best.abs().max() <= 1.0
    # Replay the same random draws to get every particle, then check the kept one is the argmax.
    torch.manual_seed(123)
    obs_rep = obs.repeat_interleave(10, 0)
    x, noise = 0.5 * torch.randn(60, 2), torch.randn(5, 60, 2)
    with torch.no_grad():
        particles = sdac.reverse_chain(denoiser, sched, obs_rep, x, noise).clamp(-1, 1).view(6, 10, 2)
    expected = particles[torch.arange(6), q(None, particles).argmax(1)]
    torch.testing.assert_close(best, expected)


def test_reweighted_score_matching_loss_hand_checked():
    # One state, two reverse samples, 1-D action: weights softmax([0, ln 3]) = [1/4, 3/4];
    # loss = mean over (R=2) of w * (0 - eps)^2 = (0.25 * 1 + 0.75 * 4) / 2.
    eps_pred = torch.zeros(1, 1)
    eps = torch.tensor([[[1.0], [2.0]]])
    q = torch.tensor([[0.0, math.log(3.0) * 0.5]])
    loss = sdac.reweighted_score_matching_loss(eps_pred, eps, q, temperature=0.5)
    assert loss.item() == pytest.approx(1.625)
    # A large temperature gives uniform weights: plain denoising MSE / R.
    loss_uniform = sdac.reweighted_score_matching_loss(eps_pred, eps, q, temperature=1e9)
    assert loss_uniform.item() == pytest.approx((0.5 * 1 + 0.5 * 4) / 2)


def test_smoke_run_crosses_episode_boundaries_and_resumes(tmp_path):
    # 2 envs x 40-step episodes: 160 env steps end 4 episodes (truncations) and run 48 updates.
    first = run_script("sdac.py", *TINY, "--total-timesteps", "160", "--eval-frequency", "80", "--save-model",
                       "--checkpoint-frequency", "80", cwd=tmp_path)
    assert "eval  step" in first.stdout and "SPS" in first.stdout
    (run_dir,) = run_dirs(tmp_path)
    summary = read_summary(run_dir)
    for key in ("args", "eval", "final_eval_return", "best_eval_return", "sps", "wall_seconds"):
        assert key in summary, key
    assert [e["step"] for e in summary["eval"]] == [80, 160]
    assert summary["final_eval_return"] == summary["eval"][-1]["mean_return"] < 0  # Pendulum returns are negative
    scalars = tensorboard_scalars(run_dir)
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/qf1_loss",
                "losses/qf_loss", "losses/actor_loss", "losses/alpha", "eval/episodic_return"):
        assert tag in scalars, tag
    assert [v for _, v in scalars["charts/episodic_length"]] == [40.0] * 4
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "checkpoint.pt.tmp").exists()

    resumed = run_script("sdac.py", "--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "240",
                         cwd=tmp_path)
    assert "resumed" in resumed.stdout and "at step 160" in resumed.stdout
    assert run_dirs(tmp_path) == [run_dir]  # continues in the same run directory
    summary = read_summary(run_dir)
    assert [e["step"] for e in summary["eval"]] == [80, 160, 240]
    assert summary["args"]["num_particles"] == 4  # saved flags came back
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["global_step"] == 240 and ckpt["rb"]["size"] == 240
    assert ckpt["update_step"] == (240 - 64) // 2 + 1
    # Row k holds env k % 2 at vector step k // 2: its next_obs is the next row's obs except where an episode was
    # truncated (every 40 steps), where it is the true final obs, not the reset obs; truncations store done = 0.
    obs, next_obs, _, _, dones = ckpt["rb"]["data"]
    continues = (next_obs[:-2] == obs[2:]).all(1)
    ends = torch.arange(len(obs) - 2) // 2 % 40 == 39
    assert torch.equal(~continues, ends) and ends.sum() == 4 and dones.sum() == 0  # steps 40 and 80, two envs

    # resuming a finished run does nothing and keeps the summary (its SPS included)
    before = (run_dir / "summary.json").read_text()
    run_script("sdac.py", "--resume", str(run_dir / "checkpoint.pt"), cwd=tmp_path)
    assert (run_dir / "summary.json").read_text() == before

    assert_resume_rejects_bad_input("sdac.py", run_dir, tmp_path)


def test_terminations_cut_the_bootstrap_and_keep_the_final_obs(tmp_path):
    """InvertedPendulum-v5 terminates within ~10 random steps: those rows store done = 1 and the terminal obs."""
    run_script("sdac.py", *TINY, "--env-id", "InvertedPendulum-v5", "--total-timesteps", "80", "--save-model",
               "--eval-frequency", "80", "--eval-episodes", "1", cwd=tmp_path)
    ckpt = torch.load(run_dirs(tmp_path)[0] / "checkpoint.pt", weights_only=False)
    obs, next_obs, _, _, dones = ckpt["rb"]["data"]
    ended = ~(next_obs[:-2] == obs[2:]).all(1)
    assert dones.sum() >= 4 and torch.equal(ended, dones[:-2].bool())  # every episode end here is a termination
    assert (next_obs[dones.bool(), 1].abs() > 0.2).all()  # the pole angle that terminated it, not a reset state


@pytest.mark.parametrize("flags, needles", [
    (["--env-id", "NoSuchEnv-v0"], ["NoSuchEnv-v0"]),
    (["--env-id", "CartPole-v1"], ["Discrete", "continuous"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--gamma", "1.5"], ["--gamma"]),
    (["--resume", "missing/checkpoint.pt"], ["--resume"]),
    (["--policy-lr-decay-steps", "0"], ["--policy-lr-decay-steps"]),
    (["--beta-schedule-scale", "2"], ["--beta-schedule-scale"]),
    (["--q-lr", "-1"], ["--q-lr"]),
    (["--tau", "nan"], ["--tau", "finite"]),
    (["--seed", "-1"], ["--seed"]),
    (["--kernels", "triton", "--hidden-dim", "48"], ["--hidden-dim", "power of two"]),
])
def test_bad_input_exits_with_one_line(tmp_path, flags, needles):
    proc = run_script("sdac.py", *TINY, "--total-timesteps", "10", *flags, cwd=tmp_path, check=False)
    assert_one_line_error(proc, *needles)


def test_capture_video_without_moviepy_fails_at_start(tmp_path):
    assert_capture_video_needs_moviepy("sdac.py", *TINY, "--total-timesteps", "10", cwd=tmp_path)


def test_learns_pendulum(tmp_path):
    """Pendulum-v1 (action bounds +-2, rescaled): random and untrained policies score about -1200 to -1700; SDAC with
    reduced particles, steps and width, and a faster EMA (tau 0.05, updated every step) must clearly beat that. One
    evaluation at one step is a poor test on this scale: across seeds a learnt policy sometimes scores -800 to -1500 at
    a single evaluation between good ones (-120 to -160), with or without --clip-actions. So: evaluations at 1500, 2000
    and 2500 env steps, and their median must beat -700. Seen here, seeds 1-6: medians -121 to -157."""
    run_script("sdac.py", "--env-id", "Pendulum-v1", "--total-timesteps", "2500", "--learning-starts", "500",
               "--num-envs", "1", "--batch-size", "64", "--eval-frequency", "500", "--eval-episodes", "4",
               "--log-frequency", "500", "--num-particles", "8", "--num-reverse-samples", "16",
               "--diffusion-steps", "5", "--hidden-dim", "64", "--q-lr", "1e-3", "--policy-lr", "1e-3",
               "--tau", "0.05", "--policy-frequency", "1", "--alpha-frequency", "10", cwd=tmp_path)
    evals = read_summary(run_dirs(tmp_path)[0])["eval"]
    late = [e["mean_return"] for e in evals if e["step"] >= 1500]
    assert len(late) == 3 and float(np.median(late)) > -700, evals


def test_init_matches_haiku_truncated_normal_per_layer():
    """hk.Linear's default init is TruncatedNormal(stddev=1/sqrt(fan_in)) = stddev * N(0,1) truncated to [-2, 2], with
    no rescale: effective std 0.8796/sqrt(fan_in), |w| <= 2/sqrt(fan_in); biases zero. Every layer of both nets."""
    torch.manual_seed(0)
    weights: dict[int, list] = {}
    for _ in range(8):
        for net in (sdac.QNetwork(17, 6, 256), sdac.Denoiser(17, 6, 256, 16, 20)):
            for layer in (m for m in net.modules() if isinstance(m, torch.nn.Linear)):
                fan_in = layer.weight.shape[1]
                weights.setdefault(fan_in, []).append(layer.weight.detach().flatten() * math.sqrt(fan_in))
                assert not layer.bias.any()
    assert set(weights) == {23, 256, 16, 32, 39}  # critic in, hidden; time MLP 16 -> 32 -> 16; denoiser in 17+6+16
    for fan_in, w in weights.items():
        z = torch.cat(w).double()
        assert z.abs().max() <= 2.0 + 1e-6, fan_in
        se = 0.6 / math.sqrt(len(z))  # sampling error of the std, generous
        assert abs(z.std().item() - 0.8796) < 5 * se + 1e-3, (fan_in, z.std().item())
        assert abs(z.mean().item()) < 5 / math.sqrt(len(z)), fan_in
    # the old 1/0.8796 rescale would give std 1.0: clearly rejected
    assert abs(torch.cat(weights[256]).std().item() - 1.0) > 0.1


def tiny_agent(clip_actions: bool, **kw):
    args = sdac.Args(batch_size=4, num_particles=3, num_reverse_samples=5, diffusion_steps=4, hidden_dim=16,
                     clip_actions=clip_actions, **kw)
    torch.manual_seed(0)
    agent = sdac.make_agent(3, 2, args, torch.device("cpu"))
    schedule = sdac.DDPMSchedule(sdac.linear_beta_schedule(4, 0.8), torch.device("cpu"))
    batch = (torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 2) * 2 - 1, torch.randn(4), torch.zeros(4))
    return args, agent, schedule, batch


def big_explore_noise(args, update_step=1):
    torch.manual_seed(1)
    noise = sdac.draw_update_noise(args, update_step, 2, torch.device("cpu"))
    return noise._replace(next_explore=torch.tensor([[4.0, -4.0]]).repeat(args.batch_size, 1))  # std 0.5 -> +-2


@pytest.mark.parametrize("clip", [True, False])
def test_td_target_next_action_is_clipped_only_with_clip_actions(clip):
    """--clip-actions: the buffer holds clipped actions, so the TD target scores a' = clip(best + noise) (the critic
    never saw actions outside the box); --no-clip-actions keeps the official unclipped a' = best + noise."""
    args, agent, schedule, batch = tiny_agent(clip)
    noise = big_explore_noise(args)
    targets = sdac.compute_targets(agent, schedule, args, batch, noise)
    best = sdac.sample_actions(agent.actor, agent.qf1, agent.qf2, schedule, batch[1], 3, 0.5, "torch",
                               noise.next_x_T, noise.next_chain)
    unclipped = best + 0.1 * 5.0 * noise.next_explore  # noise_scale * alpha (alpha starts at 5)
    expected = unclipped.clamp(-1, 1) if clip else unclipped
    torch.testing.assert_close(targets.next_actions, expected)
    assert (targets.next_actions.abs().max() <= 1.0) == clip
    with torch.no_grad():
        q = torch.min(agent.qf1_target(batch[1], expected), agent.qf2_target(batch[1], expected))
    torch.testing.assert_close(targets.td_target, 0.2 * batch[3] + 0.99 * (1 - batch[4]) * q)
    assert targets.anchor is None  # update 1 is not a policy step: no policy-loss draws, no anchor


def test_update_is_a_function_of_its_draws():
    """Same state, batch and draws give the same update; the policy-step draws must match the step's kind."""
    results = []
    for _ in range(2):
        args, agent, schedule, batch = tiny_agent(True)
        torch.manual_seed(5)
        losses = sdac.update(agent, schedule, args, batch, 0, sdac.draw_update_noise(args, 0, 2, torch.device("cpu")))
        results.append((losses, [p.detach().clone() for p in agent.actor.parameters()]))
    assert set(results[0][0]) == {"actor_loss", "alpha_loss", "qf1_loss", "qf2_loss", "qf1_values", "qf2_values"}
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    args, agent, schedule, batch = tiny_agent(True)
    with pytest.raises(ValueError, match="policy-loss draws"):
        sdac.update(agent, schedule, args, batch, 1, sdac.draw_update_noise(args, 0, 2, torch.device("cpu")))


def test_compiled_targets_equal_eager():
    """--compile compiles compute_targets (with the one-exp Mish): same targets as eager up to fp32 rounding."""
    args, agent, schedule, batch = tiny_agent(False)
    noise = sdac.draw_update_noise(args, 0, 2, torch.device("cpu"))
    eager = sdac.compute_targets(agent, schedule, args, batch, noise)
    compiled = torch.compile(sdac.compute_targets, dynamic=False)(agent, schedule, args, batch, noise)
    for name, a, b in zip(eager._fields, eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
