# Docs: docs/sdac.md
"""Soft Diffusion Actor-Critic (SDAC): online RL for diffusion policies by reweighted score matching, in one file.

Paper: Ma, Chen, Chen, Dai et al., "Efficient Online Reinforcement Learning for Diffusion Policy" (ICML 2025;
arXiv 2502.00361). Official JAX code: mahaitongdae/diffusion_policy_online_rl @ a50cf41; its defaults are the defaults.

Deviations from the official code (docs/sdac.md gives the reasons):
1. Gymnasium 1.x MuJoCo v5 envs (official: v4).
2. Exploration actions are clipped to [-1, 1] before env.step and stored clipped (`--no-clip-actions`: official).
3. The policy's noise prediction is computed once per state, not once per reverse sample (same gradients).
4. The denoiser's state projection is computed once per reverse chain (same outputs).
5. The 30k random warm-up is counted in `total_timesteps` (official: 1M steps after it).
6. With `--clip-actions` the TD target's next action is clipped too, like the stored actions it is scored against.
7. The default seed is 1, CleanRL's convention (official: 100); JAX and PyTorch draw different streams anyway.
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

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
    checkpoint_frequency: int = 50_000
    """env steps between checkpoints (with --save-model)"""
    env_id: str = "HalfCheetah-v5"
    """the id of the environment (any gymnasium env with a continuous Box action space; official default HalfCheetah)"""
    total_timesteps: int = 1_030_000
    """total env steps, warm-up included (official: 1M steps after a 30k warm-up)"""
    learning_starts: int = 30_000
    """uniform-random transitions collected before the first update"""
    num_envs: int = 5
    """parallel envs; one gradient update per vector step (UTD = 1 / num_envs)"""
    batch_size: int = 256
    """the batch size of samples from the replay memory"""
    eval_frequency: int = 50_000
    """env steps between evaluations"""
    eval_episodes: int = 20
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
    """target smoothing coefficient (applied every `policy_frequency` updates)"""
    reward_scale: float = 0.2
    """rewards are multiplied by this before the TD target"""
    q_lr: float = 3e-4
    """learning rate of the Q networks"""
    policy_lr: float = 3e-4
    """initial learning rate of the denoiser"""
    policy_lr_end: float = 3e-5
    """final learning rate of the denoiser"""
    policy_lr_decay_begin: int = 25_000
    """policy updates before the linear lr decay starts"""
    policy_lr_decay_steps: int = 50_000
    """policy updates over which the lr decays linearly"""
    policy_frequency: int = 2
    """gradient updates per policy update and per target (EMA) update"""
    num_particles: int = 32
    """candidate actions per state; the one with the largest min(Q1, Q2) is kept"""
    num_reverse_samples: int = 64
    """reverse samples per state in the reweighted score-matching loss"""
    compile: bool = True
    """torch.compile the no-grad part of each update (both reverse chains and all Q evaluations; with --kernels torch;
    faster on CPU, the first two updates compile for about a minute); eager with a warning if it fails"""
    noise_scale: float = 0.1
    """std of the Gaussian exploration noise is noise_scale * alpha"""
    alpha_init: float = 5.0
    """initial temperature alpha"""
    alpha_lr: float = 7e-3
    """Adam learning rate of log alpha"""
    alpha_frequency: int = 250
    """gradient updates between alpha updates"""
    target_entropy_scale: float = -0.9
    """target entropy = target_entropy_scale * dim(A)"""
    beta_schedule_scale: float = 0.8
    """betas = beta_schedule_scale * linspace(1e-4, 0.999, T)"""
    init_noise_scale: float = 0.5
    """x_T = init_noise_scale * N(0, I)"""
    hidden_dim: int = 256
    """width of the 3 hidden layers of the denoiser and of the Q networks"""
    time_dim: int = 16
    """size of the sinusoidal time embedding"""
    clip_actions: bool = True
    """clip exploration actions to [-1, 1] before env.step (so the buffer holds clipped actions) and the TD target's
    next action alike (the official code clips neither)"""


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
    positive = ["total_timesteps", "num_envs", "batch_size", "eval_frequency", "eval_episodes", "diffusion_steps",
                "log_frequency", "status_interval", "checkpoint_frequency", "buffer_size", "policy_frequency", "num_particles",
                "num_reverse_samples", "alpha_frequency", "hidden_dim", "q_lr", "policy_lr", "policy_lr_end",
                "policy_lr_decay_steps", "alpha_lr", "init_noise_scale"]
    for name, value in vars(args).items():  # nan passes every comparison below and inf breaks Adam
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in positive:
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.noise_scale < 0 or args.policy_lr_decay_begin < 0:
        fail("--noise-scale and --policy-lr-decay-begin must be >= 0")
    if not 0 < args.beta_schedule_scale * 0.999 < 1:
        fail(f"--beta-schedule-scale must be in (0, 1/0.999) so every beta is in (0, 1), got {args.beta_schedule_scale}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be in [0, 2**32) (numpy's seed range), got {args.seed}")
    if args.learning_starts < 0 or args.learning_starts > args.buffer_size:
        fail(f"--learning-starts must be in [0, buffer-size={args.buffer_size}], got {args.learning_starts}")
    if not 0 < args.gamma <= 1 or not 0 < args.tau <= 1:
        fail(f"--gamma and --tau must be in (0, 1], got {args.gamma} and {args.tau}")
    if args.alpha_init <= 0 or args.reward_scale <= 0:
        fail("--alpha-init and --reward-scale must be positive")
    if args.time_dim < 2 or args.time_dim % 2:
        fail(f"--time-dim must be an even number >= 2, got {args.time_dim}")
    if args.max_episode_steps is not None and args.max_episode_steps <= 0:
        fail(f"--max-episode-steps must be positive, got {args.max_episode_steps}")
    if args.resume and not os.path.isfile(args.resume):
        fail(f"--resume: no checkpoint at {args.resume!r} (runs/<run_name>/checkpoint.pt is written by --save-model)")


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


def mish_one_exp(z: torch.Tensor) -> torch.Tensor:
    """mish(z) = z tanh(softplus(z)) with one exp: with e = exp(z), tanh(log(1 + e)) = e(e + 2) / (e(e + 2) + 2);
    for z > 20, mish(z) = z in fp32."""
    e = torch.exp(z.clamp(max=20.0))
    n = e * (e + 2.0)
    return torch.where(z > 20.0, z, z * n / (n + 2.0))


class Mish(nn.Module):
    """F.mish in eager mode; the one-exp formula inside torch.compile (--compile), where inductor fuses it with the
    neighbouring ops (F.mish would decompose into exp + log1p + tanh, several times slower on CPU)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return mish_one_exp(z) if torch.compiler.is_compiling() else F.mish(z)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """in -> 3 x [Linear(hidden), Mish] -> Linear(out)."""
    return nn.Sequential(haiku_linear(in_dim, hidden_dim), Mish(), haiku_linear(hidden_dim, hidden_dim), Mish(),
                         haiku_linear(hidden_dim, hidden_dim), Mish(), haiku_linear(hidden_dim, out_dim))


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, hidden_dim, 1)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)  # [B]


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


def linear_beta_schedule(diffusion_steps: int, scale: float) -> torch.Tensor:
    return scale * torch.linspace(1e-4, 0.999, diffusion_steps, dtype=torch.float64)


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

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return self.sqrt_alphas_cumprod[t, None] * x0 + self.sqrt_one_minus_alphas_cumprod[t, None] * eps


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


@torch.no_grad()
def sample_actions(denoiser: Denoiser, qf1: QNetwork, qf2: QNetwork, schedule: DDPMSchedule, obs: torch.Tensor,
                   num_particles: int, init_noise_scale: float, backend: str = "torch", x_T: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Best of `num_particles` diffusion samples per state by min(Q1, Q2): [B, S] -> [B, A] in [-1, 1].

    x_T: [B*P, A] and noise: [T, B*P, A] are standard normal draws (row b*P + p is particle p of state b), drawn here
    when not given; x_T is scaled by `init_noise_scale`."""
    batch, act_dim = obs.shape[0], denoiser.act_dim
    obs_rep = obs.repeat_interleave(num_particles, 0)  # [B*P, S], particles of a state are contiguous
    if x_T is None:
        x_T = torch.randn(batch * num_particles, act_dim, device=obs.device)
    if noise is None:
        noise = torch.randn(schedule.T, batch * num_particles, act_dim, device=obs.device)
    actions = reverse_chain(denoiser, schedule, obs_rep, init_noise_scale * x_T, noise, backend).clamp(-1.0, 1.0)
    q = torch.min(qf1(obs_rep, actions), qf2(obs_rep, actions)).view(batch, num_particles)
    return actions.view(batch, num_particles, act_dim)[torch.arange(batch, device=obs.device), q.argmax(1)]


def reweighted_score_matching_loss(eps_pred: torch.Tensor, eps: torch.Tensor, q: torch.Tensor,
                                   temperature: torch.Tensor | float) -> torch.Tensor:
    """mean over [B, R, A] of softmax_R(q / temperature) * (eps_pred - eps)^2, the official plain `.mean()`.

    eps_pred: [B, A] prediction at (s, x_t, t), shared by the R reverse samples of a state; eps: [B, R, A] the noise
    of each reverse sample a0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); q: [B, R] min-Q of each a0_hat."""
    weights = torch.softmax(q / temperature, dim=1)
    return (weights[..., None] * (eps_pred[:, None] - eps) ** 2).mean()


class Agent(NamedTuple):
    """Everything one gradient update reads and changes: online and target (EMA) networks, optimizers, log alpha."""
    actor: Denoiser
    actor_target: Denoiser
    qf1: QNetwork
    qf2: QNetwork
    qf1_target: QNetwork
    qf2_target: QNetwork
    log_alpha: torch.Tensor  # scalar, requires grad
    q_optimizer: torch.optim.Optimizer  # one Adam over both critics (Adam is per-parameter: same as one per critic)
    actor_optimizer: torch.optim.Optimizer
    alpha_optimizer: torch.optim.Optimizer


def make_agent(obs_dim: int, act_dim: int, args: Args, device: torch.device) -> Agent:
    actor = Denoiser(obs_dim, act_dim, args.hidden_dim, args.time_dim, args.diffusion_steps).to(device)
    actor_target = Denoiser(obs_dim, act_dim, args.hidden_dim, args.time_dim, args.diffusion_steps).to(device)
    qf1, qf2 = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device), QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    qf1_target = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    qf2_target = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    actor_target.load_state_dict(actor.state_dict())
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    log_alpha = torch.tensor(math.log(args.alpha_init), device=device, requires_grad=True)
    return Agent(actor, actor_target, qf1, qf2, qf1_target, qf2_target, log_alpha,
                 torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr),
                 torch.optim.Adam(actor.parameters(), lr=args.policy_lr), torch.optim.Adam([log_alpha], lr=args.alpha_lr))


def policy_lr(args: Args, policy_updates: int) -> float:
    """optax.linear_schedule(policy_lr -> policy_lr_end, transition_begin, transition_steps), in policy updates."""
    frac = min(max(policy_updates - args.policy_lr_decay_begin, 0) / args.policy_lr_decay_steps, 1.0)
    return args.policy_lr + frac * (args.policy_lr_end - args.policy_lr)


class UpdateNoise(NamedTuple):
    """Every random draw of one gradient update (standard normal unless noted); the update is a function of these.
    B = batch, P = particles, R = reverse samples, T = diffusion steps, A = action dim."""
    next_x_T: torch.Tensor  # [B*P, A] x_T of the TD target's particles (scaled by init_noise_scale)
    next_chain: torch.Tensor  # [T, B*P, A] their reverse-chain noise, row t added at step t > 0
    next_explore: torch.Tensor  # [B, A] the N(0, (noise_scale alpha)^2) noise on the target's action
    anchor_x_T: torch.Tensor | None  # the same three for the score-matching anchor a~ (None: no policy update)
    anchor_chain: torch.Tensor | None
    anchor_explore: torch.Tensor | None
    t: torch.Tensor | None  # [B] integer diffusion step of each anchor, uniform in 0..T-1
    q_sample_eps: torch.Tensor | None  # [B, A] forward noise: x_t = sqrt(abar_t) a~ + sqrt(1 - abar_t) eps
    reverse_eps: torch.Tensor | None  # [B, R, A] noise of each reverse sample a0_hat


def draw_update_noise(args: Args, update_step: int, act_dim: int, device: torch.device) -> UpdateNoise:
    """The draws of update `update_step`; the policy-loss ones only on steps that apply a policy update."""
    B, P, R, T = args.batch_size, args.num_particles, args.num_reverse_samples, args.diffusion_steps

    def chain() -> tuple[torch.Tensor, ...]:
        return (torch.randn(B * P, act_dim, device=device), torch.randn(T, B * P, act_dim, device=device),
                torch.randn(B, act_dim, device=device))

    if update_step % args.policy_frequency != 0:
        return UpdateNoise(*chain(), *[None] * 6)
    return UpdateNoise(*chain(), *chain(), torch.randint(0, T, (B,), device=device),
                       torch.randn(B, act_dim, device=device), torch.randn(B, R, act_dim, device=device))


class Targets(NamedTuple):
    """The no-grad quantities of one update, computed with the pre-update networks (as the official jitted step)."""
    next_actions: torch.Tensor  # [B, A] best-of-P action at s' plus exploration noise (clipped with --clip-actions)
    td_target: torch.Tensor  # [B] reward_scale r + gamma (1 - d) min(Q1_targ, Q2_targ)(s', a')
    anchor: torch.Tensor | None  # [B, A] score-matching anchor a~ (None: no policy update)
    x_t: torch.Tensor | None  # [B, A] the anchor noised to step t
    a0_hat: torch.Tensor | None  # [B, R, A] reverse samples, clipped to [-1, 1]
    q_rev: torch.Tensor | None  # [B, R] min(Q1, Q2) of each reverse sample


@torch.no_grad()
def compute_targets(agent: Agent, schedule: DDPMSchedule, args: Args, batch: tuple[torch.Tensor, ...],
                    noise: UpdateNoise, backend: str = "torch") -> Targets:
    """Both reverse chains (TD target's a' and the anchor a~) and every Q evaluation without gradient; the policy
    part only when `noise` holds its draws. This is ~all of an update's compute (--compile compiles this function)."""
    b_obs, b_next_obs, _, b_rewards, b_dones = batch
    a = agent
    noise_std = args.noise_scale * a.log_alpha.detach().exp()
    next_actions = sample_actions(a.actor, a.qf1, a.qf2, schedule, b_next_obs, args.num_particles,
                                  args.init_noise_scale, backend, noise.next_x_T, noise.next_chain)
    next_actions = next_actions + noise_std * noise.next_explore  # [B, A]
    if args.clip_actions:  # the buffer holds clipped actions: score the target's action inside the same box
        next_actions = next_actions.clamp(-1.0, 1.0)
    target_q = torch.min(a.qf1_target(b_next_obs, next_actions), a.qf2_target(b_next_obs, next_actions))
    td_target = args.reward_scale * b_rewards + args.gamma * (1.0 - b_dones) * target_q  # [B]
    if noise.t is None:
        return Targets(next_actions, td_target, None, None, None, None)
    # Reweighted score matching: anchor a~ (best-of-P + noise), noise it to x_t, then draw R reverse samples
    # a0_hat ~ x_t; each is later weighted by softmax(Q / alpha) over the R samples of its state.
    anchor = sample_actions(a.actor, a.qf1, a.qf2, schedule, b_obs, args.num_particles, args.init_noise_scale,
                            backend, noise.anchor_x_T, noise.anchor_chain)
    anchor = anchor + noise_std * noise.anchor_explore  # [B, A]
    t = noise.t
    x_t = schedule.q_sample(anchor, t, noise.q_sample_eps)  # [B, A]
    a0_hat = (schedule.sqrt_recip_alphas_cumprod[t, None, None] * x_t[:, None]
              - schedule.sqrt_recipm1_alphas_cumprod[t, None, None] * noise.reverse_eps).clamp(-1.0, 1.0)  # [B, R, A]
    obs_rep = b_obs.repeat_interleave(args.num_reverse_samples, 0)  # [B*R, S]
    a0_flat = a0_hat.reshape(-1, a0_hat.shape[-1])
    q_rev = torch.min(a.qf1(obs_rep, a0_flat), a.qf2(obs_rep, a0_flat)).view(len(b_obs), -1)  # [B, R]
    return Targets(next_actions, td_target, anchor, x_t, a0_hat, q_rev)


def update(agent: Agent, schedule: DDPMSchedule, args: Args, batch: tuple[torch.Tensor, ...], update_step: int,
           noise: UpdateNoise, backend: str = "torch", targets_fn=compute_targets) -> dict[str, torch.Tensor]:
    """One gradient update, as the official jitted step: critics every step; denoiser, target (EMA) networks every
    `policy_frequency` steps; log alpha every `alpha_frequency` steps. Returns the losses it computed (detached).
    `targets_fn` is `compute_targets` or its compiled version."""
    b_obs, _, b_actions, _, _ = batch
    a = agent
    alpha = a.log_alpha.detach().exp()
    update_policy = update_step % args.policy_frequency == 0
    if update_policy != (noise.t is not None):
        raise ValueError(f"update {update_step}: the policy-loss draws must be given exactly on policy-update steps")
    targets = targets_fn(a, schedule, args, batch, noise, backend)
    losses = {}

    qf1_a_values, qf2_a_values = a.qf1(b_obs, b_actions), a.qf2(b_obs, b_actions)
    qf1_loss, qf2_loss = F.mse_loss(qf1_a_values, targets.td_target), F.mse_loss(qf2_a_values, targets.td_target)
    a.q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()
    a.q_optimizer.step()

    if update_policy:
        for group in a.actor_optimizer.param_groups:
            group["lr"] = policy_lr(args, update_step // args.policy_frequency)
        eps_pred = a.actor(b_obs, targets.x_t, noise.t)  # [B, A]: the same for all R samples of a state: computed once
        # Q is in reward_scale units: the temperature makes the weights softmax(Q_env / alpha) (official: Q*5/alpha)
        actor_loss = reweighted_score_matching_loss(eps_pred, noise.reverse_eps, targets.q_rev,
                                                    args.reward_scale * alpha)
        a.actor_optimizer.zero_grad()
        actor_loss.backward()
        a.actor_optimizer.step()
        with torch.no_grad():  # EMA of all online networks, after their updates
            online = [*a.actor.parameters(), *a.qf1.parameters(), *a.qf2.parameters()]
            target = [*a.actor_target.parameters(), *a.qf1_target.parameters(), *a.qf2_target.parameters()]
            torch._foreach_lerp_(target, online, args.tau)
        losses["actor_loss"] = actor_loss.detach()

    if update_step % args.alpha_frequency == 0:
        # Entropy proxy of the Gaussian exploration noise, N(0, (noise_scale * alpha)^2) per action dim.
        act_dim = b_actions.shape[1]
        entropy = 0.5 * act_dim * torch.log(2 * math.pi * math.e * (args.noise_scale * alpha) ** 2)
        alpha_loss = -a.log_alpha * (args.target_entropy_scale * act_dim - entropy)
        a.alpha_optimizer.zero_grad()
        alpha_loss.backward()
        a.alpha_optimizer.step()
        losses["alpha_loss"] = alpha_loss.detach()
    return {**losses, "qf1_loss": qf1_loss.detach(), "qf2_loss": qf2_loss.detach(),
            "qf1_values": qf1_a_values.detach().mean(), "qf2_values": qf2_a_values.detach().mean()}


def compile_or_eager(fn):
    """torch.compile(fn) with static shapes (the batch never changes), or fn itself after one warning line when
    compilation fails (e.g. no C++ compiler for inductor's CPU backend): same math either way."""
    compiled = torch.compile(fn, dynamic=False)

    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is not None:
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # compilation failures come as several exception types
                first = str(e).splitlines()[0] if str(e) else ""
                print(f"{SCRIPT}: warning: torch.compile failed ({type(e).__name__}: {first}); training eagerly "
                      "(slower, same math)", file=sys.stderr, flush=True)
                compiled = None
        return fn(*args, **kwargs)

    return call


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
        check_resume_args(args, checkpoint["args"])
    check_env(args.env_id)
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
    agent = make_agent(obs_dim, act_dim, args, device)
    actor, actor_target, qf1, qf2, qf1_target, qf2_target, log_alpha, q_optimizer, actor_optimizer, alpha_optimizer = agent
    schedule = DDPMSchedule(linear_beta_schedule(args.diffusion_steps, args.beta_schedule_scale), device)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
    targets_fn = compile_or_eager(compute_targets) if args.compile and backend == "torch" else compute_targets

    def act(denoiser: Denoiser, obs: torch.Tensor) -> torch.Tensor:
        return sample_actions(denoiser, qf1, qf2, schedule, obs, args.num_particles, args.init_noise_scale, backend)

    # everything a checkpoint holds besides counters, alpha and RNG states (the replay buffer included)
    stateful = {"actor": actor, "actor_target": actor_target, "qf1": qf1, "qf2": qf2, "qf1_target": qf1_target,
                "qf2_target": qf2_target, "q_optimizer": q_optimizer, "actor_optimizer": actor_optimizer,
                "alpha_optimizer": alpha_optimizer, "rb": rb}
    global_step, update_step, eval_history = 0, 0, []
    if checkpoint:
        for name, module in stateful.items():
            module.load_state_dict(checkpoint[name])
        with torch.no_grad():
            log_alpha.copy_(checkpoint["log_alpha"])
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
        returns = evaluate(eval_envs, lambda obs: act(actor_target, obs), args.seed + 10_000, device)
        eval_history.append({"step": global_step, "mean_return": float(returns.mean()), "std_return": float(returns.std())})
        writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
        writer.add_scalar("eval/episodic_return_std", returns.std(), global_step)
        print(f"eval  step {global_step:>10,} | return {returns.mean():10.2f} +- {returns.std():.2f} ({len(returns)} episodes)")

    def checkpoint_state() -> dict:
        return {**{k: m.state_dict() for k, m in stateful.items()}, "log_alpha": log_alpha.detach().cpu(),
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
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
            actions_t = act(actor_target, obs_t)  # the EMA policy collects data, as in the official code
            actions_t = actions_t + args.noise_scale * alpha * torch.randn_like(actions_t)
            actions = (actions_t.clamp(-1.0, 1.0) if args.clip_actions else actions_t).cpu().numpy()

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
            noise = draw_update_noise(args, update_step, act_dim, device)
            losses.update(update(agent, schedule, args, rb.sample(args.batch_size), update_step, noise, backend,
                                 targets_fn))
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
            loss_text = " | ".join(f"{k} {v:.4g}" for k, v in values.items() if k in ("qf1_loss", "actor_loss"))
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
