# Docs: docs/dacer.md
"""Diffusion Actor-Critic with Entropy Regulator (DACER): online RL through the reverse chain, in one file.

Paper: Wang, Guo, Zou, Duan, Li et al., "Diffusion Actor-Critic with Entropy Regulator" (NeurIPS 2024;
arXiv 2405.15177). Official JAX code: happy-yan/DACER-Diffusion-with-Online-RL @ 848c1f2; its defaults are the defaults.

Deviations from the official code (docs/dacer.md gives the reasons):
1. Gymnasium 1.x MuJoCo v5 envs (official: v3 through mujoco-py).
2. The entropy estimate's Gaussian mixtures are fitted by a batched EM in PyTorch, not 256 scikit-learn fits.
3. Presets the official code leaves to comments (width, warm-up, noise factor) are resolved from the env id.
4. The policy gradient is computed only on the updates that apply it (same gradients).
5. The denoiser's state projection is computed once per reverse chain (same outputs).
6. Evaluation draws fresh DDPM noise (official: a PRNG key hashed from the observation).
7. The warm-up is counted in `total_timesteps` (official: 30M steps after it).
8. The default seed is 1, CleanRL's convention (official: 100); JAX and PyTorch draw different streams anyway.
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "diffusion-rl"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """record the first evaluation episode of every evaluation to runs/{run_name}/videos (needs moviepy)"""
    save_model: bool = False
    """write runs/{run_name}/checkpoint.pt every `checkpoint_frequency` env steps and at the end"""
    resume: str | None = None
    """path of a checkpoint.pt to continue from (flags given with it override the saved ones)"""
    checkpoint_frequency: int = 300_000
    """env steps between checkpoints (with --save-model)"""
    env_id: str = "Humanoid-v5"
    """the id of the environment (any gymnasium env with a continuous Box action space)"""
    total_timesteps: int = 30_000_000
    """total env steps, warm-up included (official: 3e7 = 1.5M updates of 20 transitions, the paper's budget)"""
    learning_starts: int | None = None
    """uniform-random transitions collected before the first update (None: 200k for Humanoid, 30k otherwise)"""
    num_envs: int = 20
    """parallel envs; one gradient update per vector step (UTD = 1 / num_envs)"""
    batch_size: int = 256
    """the batch size of samples from the replay memory"""
    eval_frequency: int = 300_000
    """env steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation (one per eval env, fixed seeds)"""
    diffusion_steps: int = 20
    """number of denoising steps T"""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """reverse-chain backend: fused Triton kernels (kernels/), plain PyTorch, or auto (Triton only where kernels/
    records a measured GPU speed-up for this configuration, else PyTorch)"""
    precision: Literal["ieee", "tf32"] = "tf32"
    """float32 matmuls on a GPU, the fused chain's included (no effect on a CPU): tf32, as JAX computes them on recent
    NVIDIA GPUs (the official runs), or ieee"""
    log_frequency: int = 5_000
    """env steps between status lines and TensorBoard loss scalars"""
    status_interval: float = 30.0
    """seconds of wall time between status lines (besides the one every `log_frequency` steps)"""
    max_episode_steps: int | None = None
    """override the env's time limit (None keeps the registered one)"""

    # Algorithm specific arguments
    buffer_size: int = 1_000_000
    """the replay memory buffer size"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient (applied every `policy_frequency` updates); also the rate of the std average b"""
    reward_scale: float = 0.2
    """rewards are multiplied by this before the TD target"""
    q_lr: float = 1e-4
    """learning rate of the Q networks"""
    policy_lr: float = 1e-4
    """learning rate of the denoiser"""
    policy_frequency: int = 2
    """gradient updates per policy update and per target (EMA) update"""
    noise_scale: float | None = None
    """std of the Gaussian exploration noise is noise_scale * alpha (None: 0.15 for Humanoid and HalfCheetah, else 0.1)"""
    alpha_init: float = 3.0
    """initial temperature alpha"""
    alpha_lr: float = 3e-2
    """Adam learning rate of log alpha"""
    alpha_frequency: int = 10_000
    """gradient updates between entropy estimates and alpha updates"""
    target_entropy_scale: float = -0.9
    """target entropy = target_entropy_scale * dim(A)"""
    entropy_samples: int = 200
    """actions sampled per batch state for the Gaussian-mixture entropy estimate"""
    gmm_components: int = 3
    """components of the Gaussian mixture fitted per state"""
    em_iterations: int = 100
    """EM iterations of the mixture fit (scikit-learn's max_iter)"""
    vp_beta_min: float = 0.1
    """b_min of the VP schedule beta_t = 1 - exp(-b_min/T - (b_max - b_min)(2t - 1)/(2T^2))"""
    vp_beta_max: float = 10.0
    """b_max of the VP schedule"""
    init_noise_scale: float = 1.0
    """x_T = init_noise_scale * N(0, I)"""
    hidden_dim: int | None = None
    """width of the 3 hidden layers of the denoiser and of the Q networks (None: 512 for Humanoid, else 256)"""
    time_dim: int = 16
    """size of the sinusoidal time embedding"""


SCRIPT = os.path.basename(__file__)


def fail(message: str) -> None:
    """Bad input: one actionable line on stderr and exit code 1, no traceback (quoted exception text is joined)."""
    sys.exit(f"{SCRIPT}: error: {' '.join(message.split())}")


def format_duration(seconds: float) -> str:
    """Seconds -> "h:mm:ss" for the status line's ETA ("?" while no rate is known)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return f"{int(seconds) // 3600}:{int(seconds) % 3600 // 60:02d}:{int(seconds) % 60:02d}"


def check_args(args: Args) -> None:
    for name, value in vars(args).items():  # "nan" and "inf" parse as floats and pass every comparison below
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    positive = ["total_timesteps", "num_envs", "batch_size", "eval_frequency", "eval_episodes", "diffusion_steps",
                "log_frequency", "status_interval", "checkpoint_frequency", "buffer_size", "policy_frequency", "alpha_frequency",
                "gmm_components", "em_iterations", "hidden_dim", "noise_scale", "q_lr", "policy_lr", "alpha_lr",
                "init_noise_scale"]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be in [0, 2**32) (numpy's seed range), got {args.seed}")
    if args.init_noise_scale > 100:  # the first step scales x_T by 1/sqrt(abar_T), up to e^50: keep far from 3e38
        fail(f"--init-noise-scale must be at most 100 (x_T = scale * N(0, I); official 1), got {args.init_noise_scale}")
    if args.learning_starts is not None and not 0 <= args.learning_starts <= args.buffer_size:
        fail(f"--learning-starts must be in [0, buffer-size={args.buffer_size}], got {args.learning_starts}")
    if not 0 < args.gamma <= 1 or not 0 < args.tau <= 1:
        fail(f"--gamma and --tau must be in (0, 1], got {args.gamma} and {args.tau}")
    if args.alpha_init <= 0 or args.reward_scale <= 0:
        fail("--alpha-init and --reward-scale must be positive")
    if args.entropy_samples <= args.gmm_components:
        fail(f"--entropy-samples must exceed --gmm-components={args.gmm_components}, got {args.entropy_samples}")
    # abar_T = exp(-(min + max) / 2): max <= 100 keeps 1 / sqrt(abar_T) <= e^50, far from float32 overflow
    if not 0 <= args.vp_beta_min < args.vp_beta_max <= 100:
        fail(f"--vp-beta-min and --vp-beta-max need 0 <= min < max <= 100, got {args.vp_beta_min} and "
             f"{args.vp_beta_max}")
    alphas = 1.0 - vp_beta_schedule(args.diffusion_steps, args.vp_beta_min, args.vp_beta_max)
    if not ((alphas > 0) & (alphas < 1)).all():  # a beta that rounds to 0 or 1 makes the posterior coefficients 0/0
        fail(f"--vp-beta-min {args.vp_beta_min} and --vp-beta-max {args.vp_beta_max} with --diffusion-steps "
             f"{args.diffusion_steps} give a beta_t that rounds to 0 or 1; every beta must be in (0, 1)")
    if args.time_dim < 2 or args.time_dim % 2:
        fail(f"--time-dim must be an even number >= 2, got {args.time_dim}")
    if args.max_episode_steps is not None and args.max_episode_steps <= 0:
        fail(f"--max-episode-steps must be positive, got {args.max_episode_steps}")
    if args.resume and not os.path.isfile(args.resume):
        fail(f"--resume: no checkpoint at {args.resume!r} (runs/<run_name>/checkpoint.pt is written by --save-model)")


def resolve_presets(args: Args) -> Args:
    """Fills the flags left at None with the official per-env settings (code comments, README, issue #9)."""
    name = args.env_id.split("-")[0]  # "Humanoid-v5" -> "Humanoid"
    if args.learning_starts is None:
        args.learning_starts = min(200_000 if name == "Humanoid" else 30_000, args.buffer_size)
    if args.noise_scale is None:
        args.noise_scale = 0.15 if name in ("Humanoid", "HalfCheetah") else 0.1
    if args.hidden_dim is None:
        args.hidden_dim = 512 if name == "Humanoid" else 256
    return args


# Flags that fix the shapes of the saved networks and buffer: a resumed run must keep them.
SHAPE_ARGS = ("env_id", "hidden_dim", "time_dim", "diffusion_steps", "buffer_size")


def load_checkpoint(path: str) -> dict:
    """torch.load with a one-line error for a file that is not one of this script's checkpoints."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated file, not a pickle, ...
        fail(f"--resume: cannot read {path!r} as a checkpoint ({type(e).__name__}: {e})")
    if not (isinstance(checkpoint, dict) and "global_step" in checkpoint
            and set(checkpoint.get("args", {"?": 0})) <= set(Args.__dataclass_fields__)):
        fail(f"--resume: {path!r} is not a checkpoint written by {SCRIPT} --save-model")
    return checkpoint


def check_resume_args(args: Args, saved: dict) -> None:
    """args with the presets resolved (hidden_dim None -> its width), as the checkpoint saved them."""
    for name in SHAPE_ARGS:
        if getattr(args, name) != saved.get(name, getattr(args, name)):
            fail(f"--resume: --{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's "
                 f"{saved[name]}; it fixes the saved networks' or buffer's shape, so leave it unset")


def make_env(env_id: str, seed: int, max_episode_steps: int | None = None, video_dir: str | None = None):
    """A thunk that builds one env whose action space is rescaled to [-1, 1] (the policy acts in [-1, 1])."""

    def thunk() -> gym.Env:
        kwargs = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
        env = gym.make(env_id, render_mode="rgb_array" if video_dir else None, **kwargs)
        if video_dir:
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, disable_logger=True)
        ones = np.ones(env.action_space.shape, dtype=np.float32)
        env = gym.wrappers.RescaleAction(env, -ones, ones)
        env.action_space.seed(seed)
        return env

    return thunk


def check_env(env_id: str) -> None:
    """Fails with one line for an unknown id or an action/observation space this script cannot handle."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:  # NameNotFound, VersionNotFound, DependencyNotInstalled, ...
        fail(f"cannot make env {env_id!r}: {e} (e.g. --env-id Ant-v5, HalfCheetah-v5, Hopper-v5, Pendulum-v1)")
    act, obs = env.action_space, env.observation_space
    env.close()
    if not isinstance(act, gym.spaces.Box):
        fail(f"{env_id} has a {type(act).__name__} action space; {SCRIPT} needs a continuous Box action space")
    if len(act.shape) != 1:
        fail(f"{env_id} has actions of shape {act.shape}; {SCRIPT} needs a 1-D Box action space")
    if not (np.all(np.isfinite(act.low)) and np.all(np.isfinite(act.high))):
        fail(f"{env_id} has unbounded actions; the diffusion policy needs finite Box bounds")
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        fail(f"{env_id} has observation space {obs}; {SCRIPT} needs a flat Box (wrap it with FlattenObservation)")


def check_video(env_id: str) -> None:
    """--capture-video renders only at the first evaluation: fail now, not hours into the run, if it cannot."""
    try:
        import moviepy  # noqa: F401
    except ImportError:
        fail("--capture-video needs moviepy: pip install moviepy (headless MuJoCo also needs MUJOCO_GL=egl)")
    try:
        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        env.render()
        env.close()
    except Exception as e:  # no OpenGL context, no pygame, ...
        fail(f"--capture-video: {env_id} cannot render ({type(e).__name__}: {e}); on a headless machine set "
             "MUJOCO_GL=egl (or osmesa)")


class ReplayBuffer:
    """Uniform replay memory kept on the training device; sampling never leaves the device."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.obs = torch.zeros(capacity, obs_dim, device=device)
        self.next_obs = torch.zeros(capacity, obs_dim, device=device)
        self.actions = torch.zeros(capacity, act_dim, device=device)
        self.rewards = torch.zeros(capacity, device=device)
        self.dones = torch.zeros(capacity, device=device)  # 1 = terminated (no bootstrap); truncations stay 0

    def add(self, obs, next_obs, actions, rewards, terminations) -> None:
        idx = torch.arange(self.pos, self.pos + len(obs)) % self.capacity
        for buf, value in zip(self.fields(), (obs, next_obs, actions, rewards, terminations)):
            buf[idx] = torch.as_tensor(np.asarray(value), dtype=torch.float32).to(buf.device, non_blocking=True)
        self.pos = (self.pos + len(obs)) % self.capacity
        self.size = min(self.size + len(obs), self.capacity)

    def sample(self, batch_size: int):
        idx = torch.randint(0, self.size, (batch_size,), device=self.obs.device)
        return tuple(buf[idx] for buf in self.fields())

    def fields(self) -> tuple[torch.Tensor, ...]:
        return self.obs, self.next_obs, self.actions, self.rewards, self.dones

    def state_dict(self) -> dict:
        return {"pos": self.pos, "size": self.size, "data": [buf[: self.size].cpu() for buf in self.fields()]}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        for buf, saved in zip(self.fields(), state["data"]):
            buf[: self.size] = saved.to(buf.device)


def haiku_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """nn.Linear with haiku's default init, as in the official JAX code: TruncatedNormal(stddev=1/sqrt(fan_in)), which
    is stddev * truncated_normal(-2, 2) with no rescale (effective std 0.880/sqrt(fan_in)), and zero bias."""
    layer = nn.Linear(in_dim, out_dim)
    std = 1.0 / math.sqrt(in_dim)
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)
    return layer


class Mish(nn.Module):
    """x tanh(softplus(x)), written out as the official code writes it: on the CPU these three kernels take about half
    the time of nn.Mish's fused one, forward and backward (which matters in the 20-step chain); nn.Mish on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mish(x) if x.is_cuda else x * torch.tanh(F.softplus(x))


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """in -> 3 x [Linear(hidden), Mish] -> Linear(out)."""
    return nn.Sequential(haiku_linear(in_dim, hidden_dim), Mish(), haiku_linear(hidden_dim, hidden_dim), Mish(),
                         haiku_linear(hidden_dim, hidden_dim), Mish(), haiku_linear(hidden_dim, out_dim))


class QNetwork(nn.Module):
    """Distributional critic: [obs, act] -> (mean [B], std [B]), std = softplus of the second output."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, hidden_dim, 2)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(torch.cat([obs, act], -1))  # [B, 2]
        return out[:, 0], F.softplus(out[:, 1])


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Scaled sinusoidal features of the integer step t: [sin(t f_j), cos(t f_j)] / sqrt(dim), f_j = 1e4^(-j/(dim/2))."""
    freqs = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1) / math.sqrt(dim)  # [len(t), dim]


class Denoiser(nn.Module):
    """Noise prediction eps_theta(s, x_t, t): MLP on [obs, x_t, temb], temb = MLP(sinusoidal(t)) (16 -> 32 -> 16)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, time_dim: int, diffusion_steps: int):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.time_mlp = nn.Sequential(haiku_linear(time_dim, 2 * time_dim), Mish(), haiku_linear(2 * time_dim, time_dim))
        self.net = mlp(obs_dim + act_dim + time_dim, hidden_dim, act_dim)
        self.register_buffer("time_features", sinusoidal_embedding(torch.arange(diffusion_steps), time_dim))  # [T, E]

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(self.time_features[t])  # t: [B] integer steps
        return self.net(torch.cat([obs, x, temb], -1))


def vp_beta_schedule(diffusion_steps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """Discretised VP SDE: beta_t = 1 - exp(-b_min/T - (b_max - b_min)(2t - 1)/(2T^2)) for t = 1..T."""
    t = torch.arange(1, diffusion_steps + 1, dtype=torch.float64)
    T = diffusion_steps
    return 1.0 - torch.exp(-beta_min / T - 0.5 * (beta_max - beta_min) * (2 * t - 1) / T**2)


class DDPMSchedule:
    """Coefficients of q(x_t | x_0) and of the DDPM posterior q(x_{t-1} | x_t, x_0), indexed by t = 0..T-1."""

    def __init__(self, betas: torch.Tensor, device: torch.device):
        betas = betas.double()
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        coefs = {
            "betas": betas,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            "posterior_std": (0.5 * posterior_variance.clamp(min=1e-20).log()).exp(),
        }
        for name, value in coefs.items():
            setattr(self, name, value.float().to(device))
        self.betas = betas.to(device)  # float64: kernels/ derives its coefficients from it, as above
        self.T = len(betas)
        # Python floats for the sampling loop, so a step multiplies by scalars instead of indexing device tensors.
        self.steps = list(zip(*(coefs[k].tolist() for k in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                                                              "posterior_mean_coef1", "posterior_mean_coef2", "posterior_std"))))


def reverse_chain(denoiser: Denoiser, schedule: DDPMSchedule, obs: torch.Tensor, x: torch.Tensor,
                  noise: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Runs x_T -> x_0. obs: [N, S]; x: [N, A] = x_T; noise: [T, N, A], noise[t] is added at step t > 0.

    Each step: x0_hat = clip(x/sqrt(abar_t) - eps * sqrt(1/abar_t - 1), -1, 1), then the posterior mean
    c1_t x0_hat + c2_t x_t plus posterior_std_t * noise[t], with no noise at the last step (t = 0)."""
    temb = denoiser.time_mlp(denoiser.time_features)  # [T, E], once per chain
    if backend == "triton":
        import kernels

        layers = [(m.weight, m.bias) for m in denoiser.net if isinstance(m, nn.Linear)]
        return kernels.reverse_chain(layers, obs, x, temb, schedule.betas, "sxt", noise=noise, clip=1.0)
    first, rest = denoiser.net[0], denoiser.net[1:]
    w_obs, w_x, w_temb = first.weight.split([obs.shape[1], x.shape[1], temb.shape[1]], dim=1)
    obs_proj = F.linear(obs, w_obs, first.bias)  # [N, H]: the state part of layer 1, hoisted out of the loop
    temb_proj = F.linear(temb, w_temb)  # [T, H]
    for t in reversed(range(schedule.T)):
        recip, recipm1, coef1, coef2, std = schedule.steps[t]
        eps = rest(obs_proj + temb_proj[t] + F.linear(x, w_x))
        x0 = (recip * x - recipm1 * eps).clamp(-1.0, 1.0)
        x = coef1 * x0 + coef2 * x
        if t > 0:
            x = x + std * noise[t]
    return x


def noisy_actions(denoiser: Denoiser, schedule: DDPMSchedule, obs: torch.Tensor, x: torch.Tensor,
                  chain_noise: torch.Tensor, explore_noise: torch.Tensor, noise_std: torch.Tensor | float,
                  backend: str = "torch") -> torch.Tensor:
    """The reverse chain from x_T = x, plus noise_std * explore_noise, clipped: [N, S] -> [N, A] in [-1, 1].

    x: [N, A]; chain_noise: [T, N, A] (see reverse_chain); explore_noise: [N, A]. Differentiable w.r.t. the denoiser
    through all T steps (the policy loss needs it); wrap in no_grad otherwise."""
    actions = reverse_chain(denoiser, schedule, obs, x, chain_noise, backend)
    return (actions + noise_std * explore_noise).clamp(-1.0, 1.0)


def draw_action_noise(n: int, act_dim: int, diffusion_steps: int, init_noise_scale: float,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of n actions: x_T = init_noise_scale * N(0, I) [n, A], chain noise [T, n, A], exploration
    noise [n, A] (N(0, I), scaled by noise_std in noisy_actions)."""
    x = init_noise_scale * torch.randn(n, act_dim, device=device)
    chain = torch.randn(diffusion_steps, n, act_dim, device=device)
    return x, chain, torch.randn(n, act_dim, device=device)


def sample_actions(denoiser: Denoiser, schedule: DDPMSchedule, obs: torch.Tensor, noise_std: torch.Tensor | float,
                   init_noise_scale: float, backend: str = "torch") -> torch.Tensor:
    """One diffusion sample per state plus N(0, noise_std^2) exploration noise, clipped: [B, S] -> [B, A] in [-1, 1]."""
    draws = draw_action_noise(obs.shape[0], denoiser.act_dim, schedule.T, init_noise_scale, obs.device)
    return noisy_actions(denoiser, schedule, obs, *draws, noise_std, backend)


def dsac_critic_loss(q_mean: torch.Tensor, q_std: torch.Tensor, td_target: torch.Tensor, td_target_sample: torch.Tensor,
                     mean_std: torch.Tensor, tau: float, epsilon: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The DSAC-T critic loss exactly as `relax/algorithm/dacer.py` writes it; all inputs [B] except mean_std [].

    mean_std (b) is a running average of the batch-mean std, -1 meaning "not started": it becomes the first batch's
    value, then b <- tau * mean(std) + (1 - tau) * b. The sampled target is bounded to mean +- 3b, and
    loss = -(b^2 + eps) * mean[mean * sg(y - mean) / (sg(std)^2 + eps)
                               + std * ((sg(mean) - y_bounded)^2 - sg(std)^2) / (sg(std)^3 + eps)].
    Returns (loss, new mean_std)."""
    batch_std = q_std.detach().mean()
    mean_std = torch.where(mean_std == -1.0, batch_std, tau * batch_std + (1.0 - tau) * mean_std)
    bound = 3.0 * mean_std
    target_bounded = (q_mean + torch.clamp(td_target_sample - q_mean, -bound, bound)).detach()
    std_detached = q_std.detach().clamp(min=0.0)
    mean_term = q_mean * (td_target - q_mean).detach() / (std_detached**2 + epsilon)
    std_term = q_std * ((q_mean.detach() - target_bounded) ** 2 - std_detached**2) / (std_detached**3 + epsilon)
    return -(mean_std**2 + epsilon) * (mean_term + std_term).mean(), mean_std


def gaussian_log_probs(x: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
    """log N(x_n | mean_k, cov_k) for every state b: x [B, N, D], means [B, K, D], covs [B, K, D, D] -> [B, K, N]."""
    chol, _ = torch.linalg.cholesky_ex(covs)  # _ex: no host sync to check for failure
    diff = (x[:, None] - means[:, :, None]).transpose(-1, -2)  # [B, K, D, N]
    z = torch.linalg.solve_triangular(chol, diff, upper=False)  # [B, K, D, N]
    log_det = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [B, K]
    return -0.5 * (x.shape[-1] * math.log(2 * math.pi) + log_det[..., None] + (z**2).sum(-2))


def gmm_m_step(x: torch.Tensor, resp: torch.Tensor, reg_covar: float):
    """Weights [B, K], means [B, K, D], full covariances [B, K, D, D] from responsibilities resp [B, N, K]."""
    counts = resp.sum(1) + 10 * torch.finfo(x.dtype).eps  # [B, K], scikit-learn's guard against empty components
    means = resp.transpose(1, 2) @ x / counts[..., None]  # [B, K, D]
    diff = x[:, None] - means[:, :, None]  # [B, K, N, D]
    covs = (resp.transpose(1, 2)[..., None] * diff).transpose(-1, -2) @ diff / counts[..., None, None]
    covs = covs + reg_covar * torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return counts / x.shape[1], means, covs


@torch.no_grad()
def fit_gmm(x: torch.Tensor, num_components: int, em_iterations: int, kmeans_iterations: int = 10,
            reg_covar: float = 1e-6):
    """Batched EM for one full-covariance Gaussian mixture per state: x [B, N, D] (float64 advised).

    Like scikit-learn's GaussianMixture it starts from k-means (here k-means++ seeding and a few Lloyd steps, all
    states at once), then alternates E and M steps; the iteration count is fixed so nothing waits on the host.
    Returns weights [B, K], means [B, K, D], covariances [B, K, D, D]."""
    batch, n, _ = x.shape
    rows = torch.arange(batch, device=x.device)
    centers = x[rows, torch.randint(0, n, (batch,), device=x.device)][:, None]  # [B, 1, D]
    trials = 2 + int(math.log(num_components))  # greedy k-means++ as in scikit-learn: best of a few draws
    for _ in range(num_components - 1):
        d2 = torch.cdist(x, centers).pow(2).amin(-1)  # [B, N] squared distance to the nearest center
        picks = torch.multinomial(d2 + 1e-12, trials, replacement=True)  # [B, L]; +1e-12 keeps all-equal points valid
        cand_d2 = torch.minimum(d2[:, None], torch.cdist(x[rows[:, None], picks], x).pow(2))  # [B, L, N]
        best = picks[rows, cand_d2.sum(-1).argmin(-1)]  # the draw that lowers the k-means potential most
        centers = torch.cat([centers, x[rows, best][:, None]], 1)
    for _ in range(kmeans_iterations):
        labels = F.one_hot(torch.cdist(x, centers).argmin(-1), num_components).to(x.dtype)  # [B, N, K]
        counts = labels.sum(1)[..., None]  # [B, K, 1]
        centers = torch.where(counts > 0, labels.transpose(1, 2) @ x / counts.clamp(min=1), centers)
    labels = F.one_hot(torch.cdist(x, centers).argmin(-1), num_components).to(x.dtype)
    weights, means, covs = gmm_m_step(x, labels, reg_covar)
    for _ in range(em_iterations):
        log_joint = gaussian_log_probs(x, means, covs) + weights.log()[..., None]  # [B, K, N]
        resp = torch.softmax(log_joint, dim=1).transpose(1, 2)  # [B, N, K]
        weights, means, covs = gmm_m_step(x, resp, reg_covar)
    return weights, means, covs


def gmm_entropy(weights: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
    """The official estimate H = -sum_k w_k log w_k + sum_k w_k 0.5 log((2 pi e)^D |cov_k|) per state: [B].

    It is the entropy of the mixture when the components do not overlap and an upper bound on it otherwise."""
    dim = covs.shape[-1]
    component_entropy = 0.5 * dim * (1.0 + math.log(2 * math.pi)) + 0.5 * torch.linalg.slogdet(covs)[1]  # [B, K]
    return -(weights * weights.log()).sum(-1) + (weights * component_entropy).sum(-1)


def estimate_entropy(actions: torch.Tensor, num_components: int, em_iterations: int,
                     previous: torch.Tensor) -> torch.Tensor:
    """Mean over states of the mixture entropy of sampled actions [B, N, A] (fitted in float64): a 0-d tensor.

    A failed fit (cholesky_ex reports a non-positive-definite covariance instead of raising, and the entropy of that
    state becomes NaN) is left out of the mean; if every state failed, `previous` (float32, the last estimate) is
    returned. So a NaN never reaches log alpha, and nothing waits on the host."""
    weights, _, covs = fit_gmm(actions.double(), num_components, em_iterations)
    per_state = gmm_entropy(weights, covs)  # [B]
    finite = torch.isfinite(per_state)
    mean = torch.where(finite, per_state, 0.0).sum() / finite.sum()  # NaN (0/0) when no state is finite
    return torch.where(finite.any(), mean.float(), previous)


def update_actor(actor: Denoiser, optimizer: torch.optim.Optimizer, qf1: QNetwork, qf2: QNetwork, obs: torch.Tensor,
                 actions: torch.Tensor) -> torch.Tensor:
    """One policy step on -mean(min(Q1, Q2)(s, a)), `actions` differentiable w.r.t. the denoiser; returns the loss.

    The backward computes the denoiser's gradients only: the critics pass the gradient on to the actions, but their
    weight gradients (which this step would throw away) are skipped, and their .grad is left untouched."""
    new_q1, _ = qf1(obs, actions)
    new_q2, _ = qf2(obs, actions)
    actor_loss = -torch.min(new_q1, new_q2).mean()
    optimizer.zero_grad()
    actor_loss.backward(inputs=list(actor.parameters()))
    optimizer.step()
    return actor_loss.detach()


def draw_update_noise(args: Args, act_dim: int, update_step: int, device: torch.device) -> dict:
    """Every random draw of one update, drawn up front so the update itself is a function of its inputs (the parity
    harness passes the official code's draws instead). Keys: "next" (the TD target's next action), "q1_z"/"q2_z"
    ([B] return samples of the target critics), "entropy" (entropy_samples actions per batch state, only on alpha
    updates) and "new" (the policy step's action, only on policy updates); each action entry is draw_action_noise's
    triple."""
    batch, steps, scale = args.batch_size, args.diffusion_steps, args.init_noise_scale
    noise = {"next": draw_action_noise(batch, act_dim, steps, scale, device),
             "q1_z": torch.randn(batch, device=device), "q2_z": torch.randn(batch, device=device)}
    if update_step % args.alpha_frequency == 0:
        noise["entropy"] = draw_action_noise(batch * args.entropy_samples, act_dim, steps, scale, device)
    if update_step % args.policy_frequency == 0:
        noise["new"] = draw_action_noise(batch, act_dim, steps, scale, device)
    return noise


def update(agent: dict, log_alpha: torch.Tensor, stats: dict[str, torch.Tensor], schedule: DDPMSchedule,
           batch: tuple[torch.Tensor, ...], noise: dict, update_step: int, args: Args, target_entropy: float,
           backend: str = "torch") -> dict[str, torch.Tensor]:
    """One gradient update, the official jitted step's order: TD target, entropy estimate and policy loss from the
    pre-update networks; then the critic step, the policy step (every policy_frequency updates), the target EMA
    (same period) and the alpha step (every alpha_frequency updates, on the entropy just estimated).

    agent: the nets ("actor", "qf1", "qf2", "qf1_target", "qf2_target") and optimizers ("q_optimizer",
    "actor_optimizer", "alpha_optimizer"); stats: 0-d tensors "mean_q1_std", "mean_q2_std", "entropy", updated in
    place; batch: (obs [B, S], next_obs [B, S], actions [B, A], rewards [B], dones [B]); noise: draw_update_noise's
    draws. Returns the losses and statistics to log (0-d tensors)."""
    actor, qf1, qf2 = agent["actor"], agent["qf1"], agent["qf2"]
    b_obs, b_next_obs, b_actions, b_rewards, b_dones = batch
    noise_std = args.noise_scale * log_alpha.detach().exp()
    update_policy = update_step % args.policy_frequency == 0
    update_alpha = update_step % args.alpha_frequency == 0
    losses = {}
    with torch.no_grad():  # the target and the entropy use the pre-update networks, as the official jitted step
        next_actions = noisy_actions(actor, schedule, b_next_obs, *noise["next"], noise_std, backend)  # online policy
        next_q1_mean, next_q1_std = agent["qf1_target"](b_next_obs, next_actions)
        next_q2_mean, next_q2_std = agent["qf2_target"](b_next_obs, next_actions)
        # a return sample of each target critic, z clipped to +-3; y_s follows the critic with the smaller mean
        next_q1_sample = next_q1_mean + next_q1_std * noise["q1_z"].clamp(-3.0, 3.0)
        next_q2_sample = next_q2_mean + next_q2_std * noise["q2_z"].clamp(-3.0, 3.0)
        next_q_sample = torch.where(next_q1_mean < next_q2_mean, next_q1_sample, next_q2_sample)
        not_done = args.gamma * (1.0 - b_dones)
        td_target = args.reward_scale * b_rewards + not_done * torch.min(next_q1_mean, next_q2_mean)
        td_target_sample = args.reward_scale * b_rewards + not_done * next_q_sample
        if update_alpha:
            # entropy_samples actions per batch state (with exploration noise and clip), one mixture fit per state
            obs_rep = b_obs.repeat_interleave(args.entropy_samples, 0)  # [B*N, S]
            samples = noisy_actions(actor, schedule, obs_rep, *noise["entropy"], noise_std, backend)
            samples = samples.view(args.batch_size, args.entropy_samples, -1)  # [B, N, A]
            stats["entropy"].copy_(estimate_entropy(samples, args.gmm_components, args.em_iterations, stats["entropy"]))

    if update_policy:
        # Backprop min(Q1, Q2) of the pre-update critics through all T denoising steps; no log-pi term.
        new_actions = noisy_actions(actor, schedule, b_obs, *noise["new"], noise_std, backend)  # [B, A], with grad
        losses["actor_loss"] = update_actor(actor, agent["actor_optimizer"], qf1, qf2, b_obs, new_actions)

    qf1_a_values, qf1_a_std = qf1(b_obs, b_actions)
    qf2_a_values, qf2_a_std = qf2(b_obs, b_actions)
    qf1_loss, mean_q1_std = dsac_critic_loss(qf1_a_values, qf1_a_std, td_target, td_target_sample,
                                             stats["mean_q1_std"], args.tau)
    qf2_loss, mean_q2_std = dsac_critic_loss(qf2_a_values, qf2_a_std, td_target, td_target_sample,
                                             stats["mean_q2_std"], args.tau)
    agent["q_optimizer"].zero_grad()
    (qf1_loss + qf2_loss).backward()
    agent["q_optimizer"].step()
    stats["mean_q1_std"].copy_(mean_q1_std)
    stats["mean_q2_std"].copy_(mean_q2_std)
    if update_policy:
        with torch.no_grad():  # target <- tau * online + (1 - tau) * target, from the just-updated critics
            torch._foreach_lerp_([*agent["qf1_target"].parameters(), *agent["qf2_target"].parameters()],
                                 [*qf1.parameters(), *qf2.parameters()], args.tau)

    if update_alpha:
        alpha_loss = -log_alpha * (target_entropy - stats["entropy"])
        agent["alpha_optimizer"].zero_grad()
        alpha_loss.backward()
        agent["alpha_optimizer"].step()
        losses["alpha_loss"] = alpha_loss.detach()
    losses.update(qf1_loss=qf1_loss.detach(), qf2_loss=qf2_loss.detach(), qf1_values=qf1_a_values.detach().mean(),
                  qf2_values=qf2_a_values.detach().mean(), qf1_std=qf1_a_std.detach().mean(),
                  qf2_std=qf2_a_std.detach().mean(), mean_q1_std=mean_q1_std.detach(),
                  mean_q2_std=mean_q2_std.detach(), entropy=stats["entropy"].clone())
    return losses


@torch.no_grad()
def evaluate(envs: list[gym.Env], policy, seed: int, device: torch.device) -> np.ndarray:
    """One episode per env from fixed seeds, actions for all unfinished envs in one batch: returns [len(envs)]."""
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns, running = np.zeros(len(envs)), list(range(len(envs)))
    while running:
        batch = torch.as_tensor(np.stack([obs[i] for i in running]), dtype=torch.float32, device=device)
        actions = policy(batch).clamp(-1.0, 1.0).cpu().numpy()
        still_running = []
        for i, action in zip(running, actions):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += reward
            if not (terminated or truncated):
                still_running.append(i)
        running = still_running
    return returns


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: a crash while writing leaves the previous checkpoint intact."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def resolve_backend(choice: str, device: torch.device, hidden_dim: int, precision: str = "tf32") -> str:
    """`auto` -> Triton only on CUDA and only where kernels/ records a measured speed-up over this script's PyTorch
    chain for this width and precision (`kernels.prefer_triton`), else PyTorch; `triton` without kernels/ is an error."""
    if choice == "torch":
        return "torch"
    if hidden_dim < 16 or hidden_dim & (hidden_dim - 1):  # the fused kernel tiles H in power-of-two chunks
        if choice == "triton":
            fail(f"--kernels triton needs --hidden-dim a power of two >= 16, got {hidden_dim}; use --kernels torch")
        return "torch"
    try:
        import kernels

        kernels.reverse_chain  # noqa: B018 (an empty kernels/ folder imports as a namespace package)
    except (ImportError, AttributeError) as e:
        if choice == "triton":
            fail(f"--kernels triton needs the kernels/ package next to {SCRIPT} and triton ({e}); use --kernels torch")
        return "torch"
    if choice == "triton":
        return "triton"
    prefer_triton = getattr(kernels, "prefer_triton", None)  # older kernels/ record no measurements
    return "triton" if device.type == "cuda" and prefer_triton and prefer_triton(device, hidden_dim, precision) else "torch"


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    checkpoint = None
    if args.resume:  # the saved flags become the defaults; flags given now override them
        checkpoint = load_checkpoint(args.resume)
        args = tyro.cli(Args, default=Args(**{**checkpoint["args"], "resume": args.resume}))
        check_args(args)
    check_env(args.env_id)
    args = resolve_presets(args)
    if checkpoint:
        check_resume_args(args, checkpoint["args"])
    if args.capture_video:
        check_video(args.env_id)
    run_name = checkpoint["run_name"] if checkpoint else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if checkpoint else os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True, resume="allow" if checkpoint else None)
    # on resume, drop scalars logged after the checkpoint (the run redoes those steps); its own step's were saved
    writer = SummaryWriter(run_dir, purge_step=checkpoint["global_step"] + 1 if checkpoint else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cuda":  # tf32: float32 matmuls on TF32 tensor cores (JAX's default on GPUs)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    precision = args.precision if device.type == "cuda" else "ieee"  # a CPU computes float32 matmuls in IEEE fp32
    backend = resolve_backend(args.kernels, device, args.hidden_dim, args.precision)
    print(f"device {device} | reverse chain: {backend} backend, precision {precision}")

    # env setup: SAME_STEP autoreset, so the true final observation of an episode arrives in infos["final_obs"]
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, args.seed + i, args.max_episode_steps) for i in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    eval_envs = [make_env(args.env_id, args.seed + 10_000 + i, args.max_episode_steps,
                          os.path.join(run_dir, "videos") if args.capture_video and i == 0 else None)()
                 for i in range(args.eval_episodes)]
    envs.action_space.seed(args.seed)
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]

    # ALGO LOGIC: initialize agent here
    actor = Denoiser(obs_dim, act_dim, args.hidden_dim, args.time_dim, args.diffusion_steps).to(device)
    qf1, qf2 = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device), QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    qf1_target = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    qf2_target = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    log_alpha = torch.tensor(math.log(args.alpha_init), device=device, requires_grad=True)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    target_entropy = args.target_entropy_scale * act_dim
    schedule = DDPMSchedule(vp_beta_schedule(args.diffusion_steps, args.vp_beta_min, args.vp_beta_max), device)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
    # DSAC-T running averages b of the critics' batch-mean std (-1 = not started) and the last entropy estimate
    stats = {"mean_q1_std": torch.tensor(-1.0, device=device), "mean_q2_std": torch.tensor(-1.0, device=device),
             "entropy": torch.tensor(0.0, device=device)}

    def act(denoiser: Denoiser, obs: torch.Tensor, noise_std: torch.Tensor | float) -> torch.Tensor:
        return sample_actions(denoiser, schedule, obs, noise_std, args.init_noise_scale, backend)

    # the nets and optimizers `update` steps; with the replay buffer, everything a checkpoint holds besides
    # counters, alpha, stats and RNG states
    agent = {"actor": actor, "qf1": qf1, "qf2": qf2, "qf1_target": qf1_target, "qf2_target": qf2_target,
             "q_optimizer": q_optimizer, "actor_optimizer": actor_optimizer, "alpha_optimizer": alpha_optimizer}
    stateful = {**agent, "rb": rb}
    global_step, update_step, eval_history = 0, 0, []
    if checkpoint:
        for name, module in stateful.items():
            module.load_state_dict(checkpoint[name])
        with torch.no_grad():
            log_alpha.copy_(checkpoint["log_alpha"])
            for name, value in stats.items():
                value.copy_(checkpoint[name])
        global_step, update_step, eval_history = checkpoint["global_step"], checkpoint["update_step"], checkpoint["eval"]
        set_rng_states(checkpoint["rng"])
        print(f"resumed {run_name} at step {global_step:,} (replay buffer: {rb.size:,} transitions)")

    def write_summary(wall_seconds: float, sps: float) -> None:
        returns = [e["mean_return"] for e in eval_history]
        summary = {"args": asdict(args), "eval": eval_history, "final_eval_return": returns[-1] if returns else None,
                   "best_eval_return": max(returns) if returns else None, "sps": sps, "wall_seconds": wall_seconds,
                   "global_step": global_step, "kernels": backend, "precision": precision, "device": str(device)}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)

    def run_evaluation() -> None:
        returns = evaluate(eval_envs, lambda obs: act(actor, obs, 0.0), args.seed + 10_000, device)  # no added noise
        eval_history.append({"step": global_step, "mean_return": float(returns.mean()), "std_return": float(returns.std())})
        writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
        writer.add_scalar("eval/episodic_return_std", returns.std(), global_step)
        print(f"eval  step {global_step:>10,} | return {returns.mean():10.2f} +- {returns.std():.2f} ({len(returns)} episodes)")

    def checkpoint_state() -> dict:
        return {**{k: m.state_dict() for k, m in stateful.items()}, "log_alpha": log_alpha.detach().cpu(),
                **{name: value.cpu() for name, value in stats.items()},
                "args": {**asdict(args), "resume": None}, "run_name": run_name, "global_step": global_step,
                "update_step": update_step, "eval": eval_history, "rng": rng_states(),
                "wall_seconds": prior_wall + time.time() - start_time}

    start_time, start_step = time.time(), global_step
    prior_wall = checkpoint["wall_seconds"] if checkpoint else 0.0
    episode_returns, episode_lengths = np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=int)
    last_return, losses, last_log = float("nan"), {}, (global_step, start_time)

    # TRY NOT TO MODIFY: start the game
    obs, _ = envs.reset(seed=args.seed + global_step)
    while global_step < args.total_timesteps:
        # ALGO LOGIC: put action logic here
        alpha = log_alpha.detach().exp()
        if rb.size < args.learning_starts:
            actions = envs.action_space.sample()
        else:
            with torch.no_grad():  # the online policy collects data: one sample + N(0, (noise_scale alpha)^2), clip
                actions = act(actor, torch.as_tensor(obs, dtype=torch.float32, device=device),
                              args.noise_scale * alpha).cpu().numpy()

        # TRY NOT TO MODIFY: execute the game and log data.
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        prev_step, global_step = global_step, global_step + args.num_envs
        episode_returns += rewards
        episode_lengths += 1
        for i in np.flatnonzero(terminations | truncations):
            last_return = float(episode_returns[i])
            writer.add_scalar("charts/episodic_return", last_return, global_step)
            writer.add_scalar("charts/episodic_length", episode_lengths[i], global_step)
            episode_returns[i], episode_lengths[i] = 0.0, 0

        # TRY NOT TO MODIFY: save data to replay buffer; the true final obs replaces the reset obs of a finished env
        real_next_obs = next_obs.copy()
        for i in np.flatnonzero(infos.get("_final_obs", [])):
            real_next_obs[i] = infos["final_obs"][i]
        rb.add(obs, real_next_obs, actions, rewards, terminations)

        # TRY NOT TO MODIFY: CRUCIAL step easy to overlook
        obs = next_obs

        # ALGO LOGIC: training.
        if rb.size >= args.learning_starts:
            batch = rb.sample(args.batch_size)
            noise = draw_update_noise(args, act_dim, update_step, device)
            losses.update(update(agent, log_alpha, stats, schedule, batch, noise, update_step, args, target_entropy,
                                 backend))
            update_step += 1

        # TRY NOT TO MODIFY: logging, evaluation and checkpoints at fixed env-step intervals; a status line also
        # every `status_interval` seconds, so that a slow run (Ant on a CPU: ~5 env steps/s) shows it is alive
        log_now, now = global_step // args.log_frequency > prev_step // args.log_frequency, time.time()
        if log_now or now - last_log[1] >= args.status_interval:
            values = {k: v.item() for k, v in losses.items()}
            if log_now:  # TensorBoard scalars stay step-based
                writer.add_scalar("charts/SPS", int((global_step - start_step) / (now - start_time)), global_step)
                writer.add_scalar("losses/alpha", alpha.item(), global_step)
                for k, v in values.items():
                    writer.add_scalar(f"losses/{k}", v, global_step)
                if values:
                    writer.add_scalar("losses/qf_loss", (values["qf1_loss"] + values["qf2_loss"]) / 2, global_step)
            sps, last_log = (global_step - last_log[0]) / max(now - last_log[1], 1e-9), (global_step, now)  # recent
            eta = format_duration((args.total_timesteps - global_step) / sps) if sps > 0 else "?"
            loss_text = " | ".join(f"{k} {v:.4g}" for k, v in values.items() if k in ("qf1_loss", "actor_loss", "entropy"))
            print(f"step {global_step:>10,} | SPS {sps:>7.1f} | ETA {eta} | return {last_return:10.2f} | "
                  f"alpha {alpha.item():.3f}"
                  + (f" | {loss_text}" if loss_text else " | warm-up"), flush=True)
        if global_step // args.eval_frequency > prev_step // args.eval_frequency or global_step >= args.total_timesteps:
            run_evaluation()
            write_summary(prior_wall + time.time() - start_time, (global_step - start_step) / (time.time() - start_time))
            last_log = (global_step, time.time())  # the status line's SPS and ETA leave the evaluation out
        if args.save_model and (global_step // args.checkpoint_frequency > prev_step // args.checkpoint_frequency
                                or global_step >= args.total_timesteps):
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), checkpoint_state())

    if global_step == start_step and not eval_history:  # resumed at or past --total-timesteps before any evaluation
        run_evaluation()
    wall = time.time() - start_time
    if global_step > start_step or not os.path.exists(os.path.join(run_dir, "summary.json")):  # else keep its SPS
        write_summary(prior_wall + wall, (global_step - start_step) / max(wall, 1e-9))
    print(f"done: {global_step:,} env steps in {wall:.0f} s; final eval return {eval_history[-1]['mean_return']:.2f}; "
          f"summary in {os.path.join(run_dir, 'summary.json')}")
    envs.close()
    for env in eval_envs:
        env.close()
    writer.close()
