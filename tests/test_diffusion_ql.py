"""Tests of diffusion_ql.py: the VP schedule, the sampler, the official Q-term normalisation and EMA start, the
evaluation action choice, the data pipeline (nested Dict observations, reward transforms, the download branch), an
end-to-end run on a small Hopper-v5 Minari dataset (summary, TensorBoard, bit-exact resume), the Diffusion-QL paper's
multimodal bandit, and the one-line errors. All datasets are built in tmp_path; nothing is downloaded."""

import functools
import math
import os
import sys
import types

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffusion_ql as dql
import helpers
import offline_data
from helpers import (REPO, assert_capture_video_needs_moviepy, assert_one_line_error, assert_resume_rejects_bad_input,
                     read_summary, run_dirs, run_script, tensorboard_scalars)
from minari.data_collector import EpisodeBuffer

one_line_exit = functools.partial(helpers.one_line_exit, "diffusion_ql.py")  # fn, *args -> its one-line error

# OpenMP threads that spin while the machine is oversubscribed make a step 10-30x slower; one thread is fast everywhere.
THREADS = {"OMP_NUM_THREADS": "1"}


def script_env(root) -> dict:
    return {**THREADS, "MINARI_DATASETS_PATH": str(root), "HF_HUB_OFFLINE": "1"}


def test_vp_schedule_matches_official_values():
    schedule = dql.DDPMSchedule(dql.vp_beta_schedule(5), torch.device("cpu"))
    # values of the official vp_beta_schedule(5) (offline_algorithms.md §1.2)
    assert schedule.betas.dtype == torch.float64  # kernels/ derives its own coefficients from the float64 betas
    torch.testing.assert_close(schedule.betas, torch.tensor([0.19587, 0.45882, 0.63578, 0.75488, 0.83503],
                                                            dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, torch.tensor([0.80413, 0.43518, 0.15850, 0.03885, 0.00641]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(schedule.posterior_variance, torch.tensor([0.0, 0.159, 0.427, 0.661, 0.808]), atol=1e-3, rtol=0)
    assert schedule.posterior_std[0] < 1e-9  # log-variance clamped at 1e-20: std 1e-10, and never used at t = 0


def test_sinusoidal_embedding_is_the_official_one():
    emb = dql.sinusoidal_embedding(torch.tensor([0, 3]), 16)
    freqs = torch.exp(-torch.arange(8) * math.log(10000) / 7)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(3 * freqs), torch.cos(3 * freqs)]))


def naive_chain(denoiser, schedule, obs, x, noise):
    """The official p_sample_loop written step by step: eps on cat[x_t, temb(t), s], x0 clamp, posterior mean,
    posterior std * noise except at t = 0."""
    for t in reversed(range(schedule.T)):
        tt = torch.full((obs.shape[0],), t)
        eps = denoiser(x, tt, obs)
        x0 = (schedule.sqrt_recip_alphas_cumprod[t] * x - schedule.sqrt_recipm1_alphas_cumprod[t] * eps).clamp(-1, 1)
        mean = schedule.posterior_mean_coef1[t] * x0 + schedule.posterior_mean_coef2[t] * x
        x = mean + (t > 0) * schedule.posterior_std[t] * noise[t]
    return x


def chain_problem(N: int, hidden: int, S: int = 5, A: int = 3, T: int = 5):
    """A random denoiser (seed 0), the VP schedule and chain inputs obs [N, S], x_T [N, A], noise [T, N, A]."""
    torch.manual_seed(0)
    denoiser = dql.Denoiser(S, A, hidden, 16, T)
    schedule = dql.DDPMSchedule(dql.vp_beta_schedule(T), torch.device("cpu"))
    return denoiser, schedule, torch.randn(N, S), torch.randn(N, A), torch.randn(T, N, A)


def test_reverse_chain_matches_the_step_by_step_sampler_and_is_differentiable():
    N, A = 64, 3
    denoiser, schedule, obs, x, noise = chain_problem(N, 32)
    out = dql.reverse_chain(denoiser, schedule, obs, x, noise)
    torch.testing.assert_close(out, naive_chain(denoiser, schedule, obs, x, noise), atol=1e-5, rtol=1e-5)
    noise2 = noise.clone()
    noise2[0] = 100.0  # noise[0] is never used: no noise at the last step
    torch.testing.assert_close(dql.reverse_chain(denoiser, schedule, obs, x, noise2), out)
    out.square().sum().backward()  # gradients reach every parameter through the whole chain
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in denoiser.parameters())
    actions = dql.sample_actions(denoiser, schedule, 10 * obs)
    assert actions.shape == (N, A) and actions.abs().max() <= 1.0


def test_triton_reverse_chain_matches_torch_values_and_gradients():
    """--kernels triton routes the chain through kernels.reverse_chain (order "xts"); on CPU via the interpreter."""
    denoiser, schedule, obs, x, noise = chain_problem(8, 16)
    grads = {}
    for backend in ("torch", "triton"):
        denoiser.zero_grad()
        out = dql.reverse_chain(denoiser, schedule, obs, x, noise, backend)
        out.square().sum().backward()
        grads[backend] = (out.detach(), [p.grad.clone() for p in denoiser.parameters()])
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], atol=1e-5, rtol=1e-5)
    for g_triton, g_torch in zip(grads["triton"][1], grads["torch"][1]):
        torch.testing.assert_close(g_triton, g_torch, atol=1e-4, rtol=1e-4)


def test_bc_loss_is_noise_mse_at_the_given_steps():
    torch.manual_seed(0)
    denoiser = dql.Denoiser(2, 2, 16, 16, 5)
    schedule = dql.DDPMSchedule(dql.vp_beta_schedule(5), torch.device("cpu"))
    obs, actions = torch.randn(32, 2), torch.rand(32, 2) * 2 - 1
    t, eps = torch.randint(0, 5, (32,)), torch.randn(32, 2)
    x_t = schedule.sqrt_alphas_cumprod[t, None] * actions + schedule.sqrt_one_minus_alphas_cumprod[t, None] * eps
    expected = ((denoiser(x_t, t, obs) - eps) ** 2).mean()
    torch.testing.assert_close(dql.bc_loss(denoiser, schedule, obs, actions, t, eps), expected)


def test_one_exp_mish_matches_f_mish_values_and_slope():
    # float64: the formula the compiled step fuses; the range covers the z > 20 branch and exp underflow
    z = torch.cat([torch.linspace(-100.0, 60.0, 801, dtype=torch.float64), torch.tensor([0.0, 19.99, 20.0, 20.01])])
    torch.testing.assert_close(dql.mish_one_exp(z), F.mish(z), rtol=1e-12, atol=1e-12)
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    slope = torch.autograd.grad(F.mish(za).sum(), za)[0]
    torch.testing.assert_close(torch.autograd.grad(dql.mish_one_exp(zb).sum(), zb)[0], slope, rtol=1e-7, atol=1e-7)


def tiny_agent(obs_dim: int = 11, act_dim: int = 3, hidden: int = 32, steps: int = 5, batch: int = 32):
    """Networks, schedule and one batch of random transitions, as the training loop holds them (Hopper-sized with the
    end-to-end test's width and batch, so that test's compiled step can come from inductor's cache)."""
    torch.manual_seed(0)
    nets = {"actor": dql.Denoiser(obs_dim, act_dim, hidden, 16, steps),
            "ema_actor": dql.Denoiser(obs_dim, act_dim, hidden, 16, steps),
            **{k: dql.QNetwork(obs_dim, act_dim, hidden) for k in ("qf1", "qf2", "qf1_target", "qf2_target")}}
    for k in ("ema_actor", "qf1_target", "qf2_target"):
        nets[k].requires_grad_(False)
    schedule = dql.DDPMSchedule(dql.vp_beta_schedule(steps), torch.device("cpu"))
    batch = {"obs": torch.randn(batch, obs_dim) * 3, "next_obs": torch.randn(batch, obs_dim) * 3,
             "actions": torch.rand(batch, act_dim) * 2 - 1, "rewards": torch.randn(batch),
             "not_dones": (torch.rand(batch) > 0.2).float()}
    return nets, schedule, batch


def test_critic_losses_by_hand_with_max_q_backup():
    nets, schedule, batch = tiny_agent()
    k = 3
    x, noise = dql.draw_noise(schedule, 32 * k, 3, torch.device("cpu"))
    qf1_loss, qf2_loss, qf1_value, _ = dql.critic_losses(nets, schedule, batch, x, noise, 0.9, k, "torch")
    next_obs = batch["next_obs"].repeat_interleave(k, 0)  # rows 3i..3i+2 are next state i
    with torch.no_grad():
        a = dql.reverse_chain(nets["ema_actor"], schedule, next_obs, x, noise).clamp(-1, 1)
        q1, q2 = nets["qf1_target"](next_obs, a).view(32, k), nets["qf2_target"](next_obs, a).view(32, k)
        target = batch["rewards"] + 0.9 * batch["not_dones"] * torch.min(q1.max(1).values, q2.max(1).values)
    q_now = nets["qf1"](batch["obs"], batch["actions"])
    torch.testing.assert_close(qf1_loss, ((q_now - target) ** 2).mean())
    torch.testing.assert_close(qf1_value, q_now.mean())
    assert qf2_loss.requires_grad and not qf1_value.requires_grad


def losses_and_grads(fn_critic, fn_actor, use_qf1: bool):
    nets, schedule, batch = tiny_agent()
    torch.manual_seed(1)
    x, noise = dql.draw_noise(schedule, 32, 3, torch.device("cpu"))
    t, eps = torch.randint(0, 5, (32,)), torch.randn(32, 3)
    qf1_loss, qf2_loss, _, _ = fn_critic(nets, schedule, batch, x, noise, 0.99, 1, "torch")
    (qf1_loss + qf2_loss).backward()
    critic_params = [*nets["qf1"].parameters(), *nets["qf2"].parameters()]
    critic_grads = [p.grad.clone() for p in critic_params]
    for p in critic_params:
        p.requires_grad_(False)
    bc, ql = fn_actor(nets, schedule, batch, t, eps, x, noise, use_qf1, "torch")
    (bc + ql).backward()
    assert all(p.grad is None or p.grad.equal(g) for p, g in zip(critic_params, critic_grads))  # untouched by actor
    return [qf1_loss, qf2_loss, bc, ql], critic_grads + [p.grad for p in nets["actor"].parameters()]


def test_compiled_losses_give_the_eager_losses_and_gradients():
    """--compile fuses both losses (one-exp Mish inside); the math must stay the eager one. Inductor's C++ backend
    must build on the CI CPU (a cold cache compiles for ~1 min there)."""
    critic, actor = torch.compile(dql.critic_losses, dynamic=False), torch.compile(dql.actor_losses, dynamic=False)
    for use_qf1 in (False, True):  # both heads' variants (the training loop compiles both)
        eager = losses_and_grads(dql.critic_losses, dql.actor_losses, use_qf1)
        compiled = losses_and_grads(critic, actor, use_qf1)
        for c, e in zip(compiled[0], eager[0]):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
        for c, e in zip(compiled[1], eager[1]):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eager[0][3], losses_and_grads(dql.critic_losses, dql.actor_losses, False)[0][3])


def test_q_term_normalises_by_the_other_heads_mean_abs_q_without_gradient():
    q1 = torch.tensor([1.0, 3.0, -2.0, 6.0], requires_grad=True)
    q2 = torch.tensor([-4.0, 2.0, 2.0, 4.0], requires_grad=True)
    loss = dql.q_term(q1, q2, use_q1=True)
    assert loss.item() == pytest.approx(-(8 / 4) / 3.0)  # -mean(Q1) / mean|Q2|
    loss.backward()
    torch.testing.assert_close(q1.grad, torch.full((4,), -1 / (4 * 3.0)))
    assert q2.grad is None or q2.grad.abs().sum() == 0  # the normaliser is detached
    assert dql.q_term(q1, q2, use_q1=False).item() == pytest.approx(-1.0 / 3.0)  # -mean(Q2) / mean|Q1|


def test_ema_starts_at_ema_start_every_ema_frequency_steps():
    ema, online = [torch.zeros(3)], [torch.ones(3)]
    moved = [dql.update_ema(ema, online, step, start=10, every=5, decay=0.995) for step in range(20)]
    assert [s for s, m in enumerate(moved) if m] == [10, 15]  # nothing before step 10 (still the initial copy)
    torch.testing.assert_close(ema[0], torch.full((3,), 1 - 0.995**2))


class PreferQ(torch.nn.Module):
    """A critic that prefers actions near `target`: Q(s, a) = -scale |a - target|^2."""

    def __init__(self, target, scale: float):
        super().__init__()
        self.target, self.scale = torch.tensor(target), scale

    def forward(self, obs, act):
        return -self.scale * (act - self.target).square().sum(-1)


def test_select_actions_ranks_online_actor_candidates_by_the_target_critics(monkeypatch):
    """The official `sample_action`: candidates from the online actor (not the EMA one), drawn by softmax over the
    candidates of min(Q1', Q2') of the target critics (not the online ones)."""
    nets, schedule, _ = tiny_agent(obs_dim=2, act_dim=2)
    B, K = 6, 16
    obs = torch.randn(B, 2) * 3
    # the target heads prefer two different points (so the min matters), the online heads a third one
    nets.update(qf1_target=PreferQ([0.5, 0.5], 1e6), qf2_target=PreferQ([0.3, -0.2], 1e6),
                qf1=PreferQ([-0.5, -0.5], 1e6), qf2=PreferQ([-0.5, -0.5], 1e6))
    torch.manual_seed(7)
    candidates = dql.sample_actions(nets["actor"], schedule, obs.repeat_interleave(K, 0))  # [B*K, A]
    q = {k: nets[k](None, candidates).view(B, K) for k in ("qf1_target", "qf2_target", "qf1")}
    best = candidates.view(B, K, 2)[torch.arange(B), torch.min(q["qf1_target"], q["qf2_target"]).argmax(1)]
    torch.manual_seed(7)
    chosen = dql.select_actions(nets, schedule, obs, K)  # Q gaps of >= 1e2 between candidates: the softmax is argmax
    torch.testing.assert_close(chosen, best, rtol=0, atol=0)
    for wrong in (q["qf1_target"].argmax(1), q["qf1"].argmax(1)):  # one target head alone, the online heads
        assert not torch.equal(candidates.view(B, K, 2)[torch.arange(B), wrong], best)
    torch.manual_seed(7)
    ema_candidates = dql.sample_actions(nets["ema_actor"], schedule, obs.repeat_interleave(K, 0))
    assert not torch.isclose(ema_candidates, candidates).all()  # the EMA actor's candidates would differ

    # temperature 1: the draw is multinomial(softmax(min Q')) over each state's candidates
    nets.update(qf1_target=PreferQ([0.5, 0.5], 2.0), qf2_target=PreferQ([0.3, -0.2], 2.0))
    seen = []
    real_multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n: seen.append(p) or real_multinomial(p, n))
    torch.manual_seed(7)
    dql.select_actions(nets, schedule, obs, K)
    q1, q2 = nets["qf1_target"](None, candidates).view(B, K), nets["qf2_target"](None, candidates).view(B, K)
    (probs,) = seen
    torch.testing.assert_close(probs, torch.softmax(torch.min(q1, q2), dim=1))
    assert probs.max() < 0.9  # not the argmax regime: the test sees a real distribution


def test_presets_resolve_from_the_dataset_id_and_flags_override_them():
    assert dql.official_task("mujoco/hopper/medium-v0") == "hopper-medium-v2"
    assert dql.official_task("D4RL/antmaze/large-diverse-v1") == "antmaze-large-diverse-v0"
    assert dql.official_task("D4RL/pen/cloned-v2") == "pen-cloned-v1"
    assert dql.official_task("toy/multimodal-bandit-v0") is None
    args, task = dql.resolve_preset(dql.Args(dataset_id="D4RL/antmaze/medium-play-v1"))
    assert task == "antmaze-medium-play-v0"
    assert (args.lr, args.eta, args.max_q_backup, args.reward_tune, args.grad_norm, args.total_timesteps,
            args.eval_episodes) == (1e-3, 2.0, True, "cql_antmaze", 2.0, 1_000_000, 100)
    args, task = dql.resolve_preset(dql.Args(dataset_id="mujoco/walker2d/medium-v0", eta=0.3, total_timesteps=7))
    assert (task, args.eta, args.grad_norm, args.total_timesteps, args.eval_episodes) == ("walker2d-medium-v2", 0.3, 1.0, 7, 10)
    args, task = dql.resolve_preset(dql.Args(dataset_id="my/data-v0", preset="kitchen"))
    assert (task, args.eta, args.total_timesteps) == ("kitchen-partial-v0", 0.005, 1_000_000)
    # auto without an official twin: the family of the env part of the id, matched exactly (not as a substring)
    families = {"mujoco/invertedpendulum/medium-v0": "hopper-medium-v2",  # "pen" is a substring, not the env
                "mujoco/inverteddoublependulum/expert-v0": "hopper-medium-v2",
                "D4RL/pen/expert-v2": "pen-human-v1", "D4RL/door/human-v2": "pen-human-v1",  # Adroit: pen's row
                "D4RL/hammer/cloned-v2": "pen-human-v1", "D4RL/relocate/expert-v2": "pen-human-v1",
                "D4RL/antmaze/open-v1": "antmaze-medium-diverse-v0", "D4RL/kitchen/other-v2": "kitchen-partial-v0",
                "D4RL/pointmaze/large-v2": "hopper-medium-v2", "penguin/data-v0": "hopper-medium-v2",
                "toy/pen-like-v0": "hopper-medium-v2"}
    assert {i: dql.resolve_preset(dql.Args(dataset_id=i))[1] for i in families} == families
    assert dql.resolve_preset(dql.Args(dataset_id="D4RL/door/human-v2"))[0].reward_tune == "normalize"


def test_dataset_transitions_cut_bootstrap_at_terminations_only(minari_root):
    dataset = offline_data.make_mujoco_dataset("test/hopper/random-v0", episodes=4, max_steps=30)
    data = dql.dataset_tensors(dataset, "no", torch.device("cpu"))
    episodes = list(dataset.iterate_episodes())
    assert data["obs"].shape == (sum(len(ep.rewards) for ep in episodes), 11)
    start = 0
    for ep in episodes:
        n = len(ep.rewards)
        torch.testing.assert_close(data["obs"][start:start + n], torch.as_tensor(ep.observations[:-1], dtype=torch.float32))
        torch.testing.assert_close(data["next_obs"][start:start + n], torch.as_tensor(ep.observations[1:], dtype=torch.float32))
        expected_last = 0.0 if ep.terminations[-1] else 1.0  # truncated episodes keep bootstrapping
        assert data["not_dones"][start + n - 1].item() == expected_last
        assert data["not_dones"][start:start + n - 1].eq(1).all()
        start += n
    tuned = dql.dataset_tensors(dataset, "cql_antmaze", torch.device("cpu"))
    torch.testing.assert_close(tuned["rewards"], (data["rewards"] - 0.5) * 4)
    tuned = dql.dataset_tensors(dataset, "normalize", torch.device("cpu"))  # the official (r - mean) / unbiased std
    torch.testing.assert_close(tuned["rewards"], (data["rewards"] - data["rewards"].mean()) / data["rewards"].std())


def test_antmaze_goal_steps_end_the_bootstrap_by_default_and_actions_are_not_clipped(minari_root):
    """D4RL's antmaze `terminals` (1 on every reward-1 step, so not_done = 0 there) for antmaze datasets by default;
    Minari's antmaze episodes never terminate. Counted on a dataset with 4 goal steps in 12 transitions."""
    marked, raw, goal_steps = offline_data.check_goal_terminals(dql, "cql_antmaze")
    torch.testing.assert_close(marked["rewards"], (raw - 0.5) * 4)  # the reward transform is unchanged
    ended = dql.dataset_tensors(offline_data.make_goal_dataset("test/antmaze/goal-ended-v0", terminate_last=True),
                                "no", torch.device("cpu"), goal_terminals=True)
    assert int((ended["not_dones"] == 0).sum()) == goal_steps + 1  # goal steps and the one real termination
    # the official code trains on the stored actions as they are: no clip to [-1, 1] (the harness in
    # benchmarks/parity/diffusion_ql.py shows a clip would change the updates wherever data leave the box)
    over = offline_data.GOAL_ACTION_OVERSHOOT
    torch.testing.assert_close(marked["actions"][0], torch.tensor([over, -over]))


class DictObsEnv(offline_data.MultimodalBanditEnv):
    """The bandit with a goal-style Dict observation, like Minari's antmaze and kitchen datasets."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.observation_space = gym.spaces.Dict({"observation": gym.spaces.Box(-1, 1, (3,)),
                                                  "desired_goal": gym.spaces.Box(-1, 1, (2,))})

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return {"observation": np.full(3, 0.5, np.float32), "desired_goal": np.full(2, -0.5, np.float32)}, {}


def test_dict_observations_are_flattened_the_same_way_for_data_and_eval_env():
    space = DictObsEnv().observation_space
    episode_obs = {"observation": np.arange(12.0).reshape(4, 3), "desired_goal": -np.arange(8.0).reshape(4, 2)}
    flat = dql.flatten_obs(episode_obs, space)  # [T+1, 5], keys in sorted order: desired_goal, observation
    np.testing.assert_array_equal(flat[1], [-2, -3, 3, 4, 5])

    class FakeDataset:
        observation_space = space

        def recover_environment(self, eval_env=False, **kwargs):
            return DictObsEnv(**kwargs)

    env = dql.make_env(FakeDataset(), seed=0)()
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, [-0.5, -0.5, 0.5, 0.5, 0.5])
    assert env.observation_space.shape == (5,)


NESTED_ENV_ID = "NestedGoalToy-v0"


def nested_goal_space(order: list[str]) -> gym.spaces.Dict:
    """Minari kitchen's layout in miniature: observation + achieved/desired goals that are Dicts keyed by task; built
    as OrderedDicts in the given (unsorted) order, which gymnasium keeps, so flattening in space order would differ."""
    from collections import OrderedDict

    goal = lambda: gym.spaces.Dict(OrderedDict([("microwave", gym.spaces.Box(-9, 9, (1,))),  # noqa: E731
                                                ("kettle", gym.spaces.Box(-9, 9, (2,)))]))
    spaces = {"observation": gym.spaces.Box(-9, 9, (2,)), "achieved_goal": goal(), "desired_goal": goal()}
    return gym.spaces.Dict(OrderedDict((k, spaces[k]) for k in order))


# leaf values in sorted order at every level: achieved_goal/kettle, achieved_goal/microwave, desired_goal/kettle,
# desired_goal/microwave, observation; the flat observation must be 1..8
NESTED_VALUES = {"achieved_goal": {"kettle": [1, 2], "microwave": [3]},
                 "desired_goal": {"kettle": [4, 5], "microwave": [6]}, "observation": [7, 8]}


class NestedGoalEnv(gym.Env):
    """One-step toy env with a nested Dict observation (constant, NESTED_VALUES); reward 0.5 whatever the action."""

    metadata = {"render_modes": []}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.observation_space = nested_goal_space(["observation", "desired_goal", "achieved_goal"])
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.obs(), {}

    def step(self, action):
        return self.obs(), 0.5, True, False, {}

    @staticmethod
    def obs(n: int | None = None):
        """The observation, or a [n, d]-per-leaf episode array of it."""
        def leaf(v):
            return np.asarray(v, np.float32) if n is None else np.tile(np.asarray(v, np.float32), (n, 1))

        return {k: {g: leaf(v) for g, v in sub.items()} if isinstance(sub, dict) else leaf(sub)
                for k, sub in NESTED_VALUES.items()}


def make_nested_goal_dataset(dataset_id: str = "toy/nested-goals-v0", episodes: int = 8):
    """Minari dataset of NestedGoalEnv (constant rewards 0.5), registered with an entry point this test module provides
    (`test_diffusion_ql:...`: a script process finds it with tests/ on PYTHONPATH)."""
    import minari

    if NESTED_ENV_ID not in gym.registry:
        gym.register(NESTED_ENV_ID, entry_point=f"{__name__}:NestedGoalEnv")
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (episodes, 1, 2)).astype(np.float32)
    buffers = [EpisodeBuffer(id=i, observations=NestedGoalEnv.obs(2), actions=actions[i], rewards=np.array([0.5]),
                             terminations=np.array([True]), truncations=np.array([False])) for i in range(episodes)]
    spec = gym.spec(NESTED_ENV_ID)
    return minari.create_dataset_from_buffers(dataset_id, buffers, env=spec, eval_env=spec, algorithm_name="uniform",
                                              author="diffusion-rl tests", author_email="tests@localhost",
                                              code_permalink="tests/test_diffusion_ql.py", ref_min_score=0.0,
                                              ref_max_score=1.0, description="nested Dict observations")


def test_nested_dict_observations_flatten_in_sorted_order_for_data_and_eval_env(minari_root):
    assert __name__ == "test_diffusion_ql"  # the entry point the dataset stores
    dataset = make_nested_goal_dataset()
    assert list(NestedGoalEnv().observation_space.spaces) == ["observation", "desired_goal", "achieved_goal"]
    assert isinstance(dataset.observation_space["achieved_goal"], gym.spaces.Dict)
    assert [leaf.shape for leaf in dql.obs_leaves(dataset.observation_space)] == [(2,), (1,), (2,), (1,), (2,)]
    dql.check_spaces(dataset, "toy/nested-goals-v0")
    data = dql.dataset_tensors(dataset, "no", torch.device("cpu"))
    np.testing.assert_array_equal(data["obs"].numpy(), np.tile(np.arange(1.0, 9.0), (8, 1)))
    env = dql.make_env(dataset, seed=0)()
    obs, _ = env.reset(seed=0)
    assert env.observation_space.shape == (8,)
    np.testing.assert_array_equal(obs, np.arange(1.0, 9.0))  # the same order although the env's space is unsorted
    np.testing.assert_array_equal(env.step(np.zeros(2))[0], np.arange(1.0, 9.0))
    # constant rewards: `normalize` would be the official 0/0 = NaN; they become 0 with a warning
    tuned = dql.dataset_tensors(dataset, "normalize", torch.device("cpu"))
    assert torch.equal(tuned["rewards"], torch.zeros(8))


def test_end_to_end_on_nested_dict_observations_with_constant_rewards(minari_root, tmp_path):
    make_nested_goal_dataset()
    pythonpath = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**script_env(minari_root), "PYTHONPATH": pythonpath}  # the script process imports NestedGoalEnv from here
    proc = run_script("diffusion_ql.py", "--dataset-id", "toy/nested-goals-v0", "--hidden-dim", "16", "--batch-size",
                      "8", "--total-timesteps", "4", "--eval-frequency", "4", "--eval-episodes", "2",
                      "--eval-candidates", "2", "--log-frequency", "2", "--reward-tune", "normalize", "--no-compile",
                      "--save-model", cwd=tmp_path, env=env)
    assert "obs 8, act 2" in proc.stdout and "are constant; --reward-tune normalize makes them all 0" in proc.stderr
    (run_dir,) = run_dirs(tmp_path)
    summary = read_summary(run_dir)
    assert summary["final_eval_return"] == pytest.approx(0.5) and summary["last_normalized_score"] == pytest.approx(50)
    assert all(math.isfinite(v) for _, v in tensorboard_scalars(run_dir)["losses/qf1_loss"])
    # a checkpoint from before any evaluation, resumed with nothing left to do: it evaluates and writes the summary
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    torch.save({**ckpt, "eval": []}, run_dir / "checkpoint.pt")
    (run_dir / "summary.json").unlink()
    run_script("diffusion_ql.py", "--resume", str(run_dir / "checkpoint.pt"), cwd=tmp_path, env=env)
    summary = read_summary(run_dir)
    assert [e["step"] for e in summary["eval"]] == [4] and summary["sps"] is None and summary["global_step"] == 4


def test_missing_dataset_is_downloaded_when_possible_else_one_line(minari_root, monkeypatch):
    """The download branch without a network: huggingface_hub "importable", a fake minari.download_dataset."""
    import importlib.util

    import minari

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace()
                        if name == "huggingface_hub" else real_find_spec(name, *a))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    downloads = []

    def fake_download(dataset_id, *args, **kwargs):
        downloads.append(dataset_id)
        offline_data.make_bandit_dataset(dataset_id, episodes=5)

    monkeypatch.setattr(minari, "download_dataset", fake_download)
    assert dql.load_dataset("toy/fetched-v0").total_episodes == 5 and downloads == ["toy/fetched-v0"]
    assert dql.load_dataset("toy/fetched-v0").total_episodes == 5 and len(downloads) == 1  # local now

    def no_network(dataset_id, *args, **kwargs):
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setattr(minari, "download_dataset", no_network)
    message = one_line_exit(dql.load_dataset, "toy/unreachable-v0")
    assert "download failed (ConnectionError)" in message
    assert "`minari download toy/unreachable-v0`" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: no download attempt at all
    monkeypatch.setattr(minari, "download_dataset", lambda *a, **k: pytest.fail("downloaded while HF_HUB_OFFLINE=1"))
    with pytest.raises(SystemExit, match="cannot be downloaded here"):
        dql.load_dataset("toy/unreachable-v0")


def test_end_to_end_on_a_small_hopper_dataset_with_resume(minari_root, tmp_path):
    offline_data.make_mujoco_dataset("test/hopper/random-v0", episodes=4, max_steps=30)
    common = ["--dataset-id", "test/hopper/random-v0", "--hidden-dim", "32", "--batch-size", "32", "--eval-frequency",
              "10", "--eval-episodes", "2", "--eval-candidates", "4", "--log-frequency", "5", "--save-model",
              "--checkpoint-frequency", "10", "--seed", "3"]
    run_script("diffusion_ql.py", *common, "--total-timesteps", "20", cwd=tmp_path, env=script_env(minari_root), timeout=300)
    (run_dir,) = run_dirs(tmp_path)
    summary = read_summary(run_dir)
    assert summary["global_step"] == 20 and [e["step"] for e in summary["eval"]] == [10, 20]
    for key in ("args", "final_eval_return", "best_eval_return", "sps", "wall_seconds", "best_normalized_score",
                "last_normalized_score"):
        assert key in summary
    assert summary["preset"] == "hopper-medium-v2" and summary["args"]["eta"] == 1.0
    last = summary["eval"][-1]
    assert last["normalized_score"] == pytest.approx(100 * (last["mean_return"] + 20.0) / 3254.0)
    scalars = tensorboard_scalars(run_dir)
    for tag in ("charts/SPS", "losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss", "losses/qf1_values",
                "losses/actor_loss", "losses/bc_loss", "losses/ql_loss", "eval/episodic_return",
                "eval/episodic_return_std", "eval/normalized_score"):
        assert tag in scalars, tag
    assert all(math.isfinite(v) for _, v in scalars["losses/actor_loss"])

    # the same run in two halves: the resumed half must end bit-identical (RNG states, optimizers, counters)
    halves = tmp_path / "halves"
    halves.mkdir()
    run_script("diffusion_ql.py", *common, "--total-timesteps", "10", cwd=halves, env=script_env(minari_root),
               timeout=300)
    (half_dir,) = run_dirs(halves)
    proc = run_script("diffusion_ql.py", "--resume", str(half_dir / "checkpoint.pt"), "--total-timesteps", "20",
                      cwd=halves, env=script_env(minari_root), timeout=300)
    assert "resumed" in proc.stdout and run_dirs(halves) == [half_dir]
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (run_dir, half_dir))
    assert a["global_step"] == b["global_step"] == 20
    for name in ("actor", "ema_actor", "qf1", "qf2", "qf1_target", "qf2_target"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), (name, key)
    assert a["actor_optimizer"]["state"][0]["exp_avg"].equal(b["actor_optimizer"]["state"][0]["exp_avg"])
    assert [e["mean_return"] for e in a["eval"]] == [e["mean_return"] for e in b["eval"]]

    # a resume with nothing left to do: no error, the summary (and its SPS) stays as it was
    before = (run_dir / "summary.json").read_text()
    proc = run_script("diffusion_ql.py", "--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "15",
                      cwd=tmp_path, env=script_env(minari_root), timeout=300)
    assert "done: 20 gradient steps" in proc.stdout and (run_dir / "summary.json").read_text() == before
    assert_resume_rejects_bad_input("diffusion_ql.py", run_dir, tmp_path, env=script_env(minari_root))

    # flags given with --resume override the saved ones: this also runs the max-Q backup and reward-normalise paths
    run_script("diffusion_ql.py", "--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "30",
               "--max-q-backup", "True", "--max-q-backup-samples", "3", "--reward-tune", "normalize", "--lr-decay",
               "--no-compile",
               cwd=tmp_path, env=script_env(minari_root), timeout=300)
    assert run_dirs(tmp_path) == [run_dir]  # same run directory
    resumed = read_summary(run_dir)
    assert resumed["global_step"] == 30 and [e["step"] for e in resumed["eval"]] == [10, 20, 30]
    assert resumed["args"]["hidden_dim"] == 32 and resumed["args"]["max_q_backup"] is True  # saved flags kept, new win
    assert summary["compile"] is True and resumed["compile"] is False  # compiled first part, eager resumed part
    # TensorBoard after resume: the checkpoint step's own scalars are kept, nothing is logged twice
    scalars = tensorboard_scalars(run_dir)
    assert [s for s, _ in scalars["eval/episodic_return"]] == [10, 20, 30]
    assert [s for s, _ in scalars["losses/qf1_loss"]] == [5, 10, 15, 20, 25, 30]


def bandit_modes(run_dir, radius: float, samples: int = 2000) -> np.ndarray:
    """Fraction of the trained actor's actions within `radius` of each bandit mode: [off-mode, mode 0 (best), ..., 3]."""
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    a = ckpt["args"]
    actor = dql.Denoiser(1, 2, a["hidden_dim"], a["time_dim"], a["diffusion_steps"])
    actor.load_state_dict(ckpt["actor"])
    schedule = dql.DDPMSchedule(dql.vp_beta_schedule(a["diffusion_steps"]), torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        actions = dql.sample_actions(actor, schedule, torch.zeros(samples, 1)).numpy()
    modes = offline_data.bandit_mode_of(actions, radius)
    return np.array([(modes == k).mean() for k in range(-1, len(offline_data.BANDIT_MODES))])


def test_bandit_bc_keeps_all_modes_and_diffusion_ql_picks_the_best(minari_root, tmp_path):
    """The paper's toy (Fig. 1) with T = 5: eta = 0 is pure diffusion BC and must spread its samples over all four
    modes; eta = 1 must put most samples on the best mode. Both runs go in parallel (one thread each)."""
    from concurrent.futures import ThreadPoolExecutor

    offline_data.make_bandit_dataset("toy/multimodal-bandit-v0", episodes=1000)
    # BC needs more, faster steps to cover the modes; the Q term pulls towards the best mode much sooner
    runs = {"bc": ("0", "1e-2", "1000"), "ql": ("1", "3e-3", "600")}

    def train(name):
        eta, lr, steps = runs[name]
        cwd = tmp_path / name
        cwd.mkdir()
        run_script("diffusion_ql.py", "--dataset-id", "toy/multimodal-bandit-v0", "--eta", eta, "--lr", lr,
                   "--batch-size", "128", "--hidden-dim", "64", "--total-timesteps", steps, "--eval-frequency", steps,
                   "--eval-episodes", "5", "--log-frequency", "200", "--save-model", "--no-compile", cwd=cwd, env=script_env(minari_root),
                   timeout=900)
        return run_dirs(cwd)[0]

    with ThreadPoolExecutor(2) as pool:
        bc_dir, ql_dir = pool.map(train, ["bc", "ql"])
    bc, ql = bandit_modes(bc_dir, radius=0.45), bandit_modes(ql_dir, radius=0.3)
    assert (bc[1:] > 0.08).all() and bc[0] < 0.5 and bc[1:].max() < 0.35, f"BC should cover all 4 modes evenly: {bc}"
    assert ql[1] > 0.6 and ql[1] > 3 * ql[2:].max(), f"Diffusion-QL should concentrate on the best mode, got {ql}"
    assert read_summary(ql_dir)["last_normalized_score"] is not None  # the bandit dataset carries ref scores


def test_recovered_bandit_env_rewards_the_best_mode(minari_root):
    import minari

    offline_data.make_bandit_dataset("toy/bandit-small-v0", episodes=20)
    env = minari.load_dataset("toy/bandit-small-v0").recover_environment(eval_env=True)
    env.reset(seed=0)
    rewards = [env.step(mode)[1] for mode in offline_data.BANDIT_MODES]
    assert rewards == pytest.approx(list(offline_data.BANDIT_MODE_REWARDS), rel=1e-4)


def test_missing_dataset_is_a_one_line_error(minari_root, tmp_path):
    proc = run_script("diffusion_ql.py", "--dataset-id", "nowhere/missing-v0", cwd=tmp_path, check=False,
                      env=script_env(minari_root))
    assert_one_line_error(proc, "nowhere/missing-v0", "minari download")


@pytest.mark.parametrize("overrides, needle", [
    ({"batch_size": 0}, "--batch-size"),
    ({"preset": "bogus"}, "--preset"),
    ({"num_envs": 2}, "--num-envs"),
    ({"eta": -1.0}, "--eta"),
    ({"time_dim": 3}, "--time-dim"),
    ({"time_dim": 2}, "--time-dim"),  # the sinusoidal frequencies divide by time_dim / 2 - 1
    ({"resume": "no/such/checkpoint.pt"}, "--resume"),
    ({"lr": -1.0}, "--lr"),
    ({"critic_lr": 0.0}, "--critic-lr"),
    ({"lr": float("nan")}, "--lr"),
    ({"grad_norm": float("inf")}, "--grad-norm"),
    ({"gamma": float("nan")}, "--gamma"),
    ({"ema_decay": 1.0}, "--ema-decay"),
    ({"ema_start": -1}, "--ema-start"),
    ({"max_q_backup_samples": 0}, "--max-q-backup-samples"),
    ({"eval_candidates": 0}, "--eval-candidates"),
    ({"eval_episodes": 0}, "--eval-episodes"),
    ({"total_timesteps": 0}, "--total-timesteps"),
    ({"seed": -1}, "--seed"),
    ({"seed": 2**32}, "--seed"),
])
def test_check_args_rejects_bad_values_with_one_line(overrides, needle):
    assert needle in one_line_exit(dql.check_args, dql.Args(**overrides))


def test_bad_flag_from_the_command_line_is_a_one_line_error(minari_root, tmp_path):
    proc = run_script("diffusion_ql.py", "--batch-size", "0", cwd=tmp_path, check=False, env=script_env(minari_root))
    assert_one_line_error(proc, "--batch-size")


def test_resume_rejects_non_checkpoints_and_shape_flags(tmp_path):
    assert one_line_exit(dql.fail, "quoted (OSError: 'a\nb')") == "diffusion_ql.py: error: quoted (OSError: 'a b')"
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    assert "cannot read" in one_line_exit(dql.load_checkpoint, str(tmp_path / "garbage.pt"))
    for name, obj in (("dict.pt", {"weights": 1}), ("sdac.pt", {"global_step": 5, "args": {"env_id": "Ant-v5"}})):
        torch.save(obj, tmp_path / name)
        message = one_line_exit(dql.load_checkpoint, str(tmp_path / name))
        assert "is not a checkpoint written by diffusion_ql.py" in message
    saved = {"global_step": 5, "args": dql.asdict(dql.Args(hidden_dim=32))}
    torch.save(saved, tmp_path / "ok.pt")
    assert dql.load_checkpoint(str(tmp_path / "ok.pt"))["global_step"] == 5
    dql.check_resume_args(dql.Args(hidden_dim=32, total_timesteps=9, eta=0.5), saved["args"])  # others may change
    for changed in ({"hidden_dim": 64}, {"dataset_id": "mujoco/walker2d/medium-v0"}, {"time_dim": 8},
                    {"diffusion_steps": 10}):
        message = one_line_exit(dql.check_resume_args, dql.Args(**{"hidden_dim": 32, **changed}), saved["args"])
        assert f"--{next(iter(changed)).replace('_', '-')}" in message and "differs from the checkpoint's" in message


def test_triton_backend_needs_a_power_of_two_hidden_width():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "power of two" in one_line_exit(dql.resolve_backend, "triton", cpu, 48)
    assert "power of two" in one_line_exit(dql.resolve_backend, "triton", cpu, 8)
    assert dql.resolve_backend("auto", cuda, 48) == "torch" and dql.resolve_backend("torch", cuda, 256) == "torch"
    assert dql.resolve_backend("triton", cpu, 32) == "triton"  # kernels/ imports here (the interpreter on CPU)


@pytest.mark.filterwarnings("ignore:.*render_mode=.rgb_array. that is not in the possible render_modes")
def test_capture_video_is_checked_at_start(minari_root, tmp_path, monkeypatch):
    offline_data.make_bandit_dataset("toy/bandit-video-v0", episodes=5)
    import minari

    dataset = minari.load_dataset("toy/bandit-video-v0")
    assert_capture_video_needs_moviepy("diffusion_ql.py", "--dataset-id", "toy/bandit-video-v0", cwd=tmp_path,
                                       env=script_env(minari_root))
    monkeypatch.setitem(sys.modules, "moviepy", None)  # import moviepy raises ImportError
    assert "pip install moviepy" in one_line_exit(dql.check_video, dataset)
    monkeypatch.setitem(sys.modules, "moviepy", types.ModuleType("moviepy"))
    # the bandit env has no rgb_array rendering: found now, not at the first evaluation
    assert "--capture-video: MultimodalBandit-v0 cannot render" in one_line_exit(dql.check_video, dataset)


def test_dataset_and_eval_env_shape_errors_are_one_line(minari_root):
    dataset = offline_data.make_bandit_dataset("toy/bandit-bounds-v0", episodes=5)

    class Degenerate:  # an action dimension with zero width would divide by zero in the [-1, 1] rescaling
        observation_space = dataset.observation_space
        action_space = gym.spaces.Box(np.array([-1, 0], np.float32), np.array([1, 0], np.float32))

    assert "high <= low" in one_line_exit(dql.check_spaces, Degenerate(), "toy/degenerate-v0")

    class ImageObs:
        observation_space = gym.spaces.Dict({"image": gym.spaces.Box(0, 1, (4, 4)),
                                             "state": gym.spaces.Box(0, 1, (2,))})
        action_space = dataset.action_space

    assert "needs flat Box spaces" in one_line_exit(dql.check_spaces, ImageObs(), "toy/image-v0")
