# Docs: docs/qvpo.md
"""Q-weighted Variational Policy Optimization (QVPO) for diffusion policies, online, in one file.

Paper: Ding, Hu, Zhang, Ren, Zhang, Yu, Wang and Shi, "Diffusion-based Reinforcement Learning via Q-weighted
Variational Policy Optimization" (NeurIPS 2024; arXiv 2405.16173). Official PyTorch code: wadx2019/qvpo @ 40a1974
(run as `main.py --weighted --aug`); its defaults are the defaults here.

Deviations from the official code (docs/qvpo.md gives the reasons):
1. Gymnasium 1.x MuJoCo v5 envs (official: gym 0.21 v3).
2. Time-limit truncations bootstrap; only `terminated` cuts the TD target (official: every `done` does).
3. Time embedding and state projection computed once per chain; the TD target reuses the kept candidate's Q.
4. `chosen` is fixed at the official default 1; the DIPO-only and `--epsilon` branches are not carried over.
5. The default seed is 1, CleanRL's convention (official: 0).
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
    checkpoint_frequency: int = 50_000
    """env steps between checkpoints (with --save-model)"""
    env_id: str = "Hopper-v5"
    """the id of the environment (any gymnasium env with a continuous Box action space)"""
    total_timesteps: int = 1_000_000
    """total env steps, warm-up included (as in the official code)"""
    learning_starts: int = 10_000
    """uniform-random transitions collected before the first update"""
    num_envs: int = 1
    """parallel envs; one gradient update per vector step (UTD = 1 / num_envs; official: 1 env, UTD 1)"""
    batch_size: int = 256
    """the batch size of samples from the replay memory"""
    eval_frequency: int = 10_000
    """env steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation (one per eval env, fixed seeds)"""
    diffusion_steps: int = 20
    """number of denoising steps T"""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """reverse-chain backend: fused Triton kernels (kernels/), plain PyTorch, or auto (Triton only where kernels/
    records a measured GPU speed-up for this configuration, else PyTorch)"""
    precision: Literal["ieee", "tf32"] = "ieee"
    """float32 matmuls on a GPU, the fused chain's included (no effect on a CPU): ieee, as PyTorch computes them (the
    official runs), or tf32"""
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
    """target smoothing coefficient of the EMA actor and critics (every update)"""
    q_lr: float = 3e-4
    """learning rate of the Q networks"""
    policy_lr: float = 1e-4
    """learning rate of the denoiser"""
    adam_eps: float = 1e-5
    """Adam epsilon of both optimizers"""
    max_grad_norm: float = 2.0
    """gradient-norm clip of the critic and of the actor (0 disables it)"""
    train_samples: int = 64
    """diffusion samples per state in the actor update; the best by min(Q1, Q2) is kept (N_d)"""
    behavior_samples: int = 4
    """candidate actions per state when collecting data; the best by min(Q1, Q2) is played (K_b)"""
    target_samples: int = 4
    """candidates per next state from the EMA actor, scored by the target critics, for the TD target (K_t)"""
    eval_samples: int = 32
    """candidates per state at evaluation"""
    q_transform: Literal["qadv", "qrelu", "qcut", "qexpn", "qcut0n", "qcut1n"] = "qadv"
    """weight of the kept sample: qadv = max(Q - mean_64 Q, 0); qrelu = max(Q, 0); qcut = max(Q, 1);
    qexpn = exp(clip((Q - m) / sd, -8, 8)); qcut0n / qcut1n = max(Q - m, 0 / 1) (m, sd: running mean/std of Q)"""
    entropy_alpha: float = 0.02
    """initial weight omega of the uniform-action entropy rows, decayed linearly over entropy_decay_steps"""
    entropy_alpha_min: float = 0.002
    """floor of omega (reached at 90% of entropy_decay_steps with the defaults); omega 0 drops the uniform rows"""
    entropy_decay_steps: int | None = None
    """env steps over which omega decays linearly to 0, floored at entropy_alpha_min. None: the total_timesteps of
    the run's first start (the official num_steps), saved so a resume with more --total-timesteps keeps omega's pace"""
    num_uniform: int = 10
    """uniform actions per state in the entropy term (N_e)"""
    hidden_dim: int = 256
    """width of the 3 hidden layers of the denoiser and of the Q networks, and of the time MLP"""
    time_dim: int = 32
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
    positive = ["total_timesteps", "num_envs", "batch_size", "eval_frequency", "eval_episodes", "diffusion_steps",
                "log_frequency", "status_interval", "checkpoint_frequency", "buffer_size", "train_samples", "behavior_samples",
                "target_samples", "eval_samples", "hidden_dim", "q_lr", "policy_lr", "adam_eps"]
    for name, value in vars(args).items():  # nan passes every comparison below and inf breaks Adam or omega * w
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in positive:
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.entropy_decay_steps is not None and args.entropy_decay_steps <= 0:
        fail(f"--entropy-decay-steps must be positive, got {args.entropy_decay_steps}")
    if args.max_grad_norm < 0 or args.num_uniform < 0:
        fail("--max-grad-norm and --num-uniform must be >= 0")
    if args.batch_size * args.train_samples < 2:
        fail("--batch-size x --train-samples must be >= 2 (the running std of the sampled Q needs two values)")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be in [0, 2**32) (numpy's seed range), got {args.seed}")
    if args.learning_starts < 0 or args.learning_starts > args.buffer_size:
        fail(f"--learning-starts must be in [0, buffer-size={args.buffer_size}], got {args.learning_starts}")
    if not 0 < args.gamma <= 1 or not 0 < args.tau <= 1:
        fail(f"--gamma and --tau must be in (0, 1], got {args.gamma} and {args.tau}")
    if not 0 <= args.entropy_alpha_min <= args.entropy_alpha:
        fail(f"need 0 <= --entropy-alpha-min <= --entropy-alpha, got {args.entropy_alpha_min} and {args.entropy_alpha}")
    if args.time_dim < 4 or args.time_dim % 2:
        fail(f"--time-dim must be an even number >= 4, got {args.time_dim}")
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


def normal_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """nn.Linear with the official init (`agent/helpers.py:init_weights`): weight ~ N(0, (1 / (2 sqrt(fan_in)))^2),
    zero bias. The official "truncated" loop rebinds a local variable, so the weights are in fact untruncated."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.normal_(layer.weight, std=1.0 / (2.0 * math.sqrt(in_dim)))
    nn.init.zeros_(layer.bias)
    return layer


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """in -> 3 x [Linear(hidden), Mish] -> Linear(out)."""
    return nn.Sequential(normal_linear(in_dim, hidden_dim), nn.Mish(), normal_linear(hidden_dim, hidden_dim), nn.Mish(),
                         normal_linear(hidden_dim, hidden_dim), nn.Mish(), normal_linear(hidden_dim, out_dim))


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, hidden_dim, 1)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)  # [B]


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the integer step t (DIPO/Diffusion-QL style, unscaled): [sin(t f_k), cos(t f_k)],
    f_k = exp(-k ln(1e4) / (dim/2 - 1)), k = 0..dim/2-1."""
    half = dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float32, device=t.device) * (math.log(10000.0) / (half - 1)))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)  # [len(t), dim]


class Denoiser(nn.Module):
    """Noise prediction eps_theta(x_t, t, s): MLP on [x_t, temb, obs], temb = MLP(sinusoidal(t)) (32 -> 256 -> 32)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, time_dim: int, diffusion_steps: int):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.time_mlp = nn.Sequential(normal_linear(time_dim, hidden_dim), nn.Mish(),
                                      normal_linear(hidden_dim, time_dim))  # 32 -> 256 -> 32
        self.net = mlp(act_dim + time_dim + obs_dim, hidden_dim, act_dim)
        self.register_buffer("time_features", sinusoidal_embedding(torch.arange(diffusion_steps), time_dim))  # [T, E]

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(self.time_features[t])  # t: [B] integer steps
        return self.net(torch.cat([x, temb, obs], -1))  # the official input order [x_t, temb, s]


def cosine_beta_schedule(diffusion_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule exactly as the official `helpers.py` computes it (fp64): abar(x) =
    cos^2((x / (T+1) + s) / (1 + s) * pi / 2) / abar(0) at x = linspace(0, T+1, T+1), beta_i = 1 - abar_{i+1} / abar_i,
    clipped to [0, max_beta]; abar hits 0 at the last point, so beta_T = 1 -> 0.999."""
    x = torch.linspace(0, diffusion_steps + 1, diffusion_steps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos((x / (diffusion_steps + 1) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0.0, max_beta)


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


# Rows per block of the no-grad MLP passes on CPU (reverse chains, candidate scoring): a block's [512, 256] activations
# stay in the L2 cache through all of its layers and steps, instead of streaming [B*K, 256] tensors through memory.
BLOCK_ROWS = 512


def mish_(h: torch.Tensor, e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """h <- mish(h) = h tanh(softplus(h)), in place (no autograd); e, d: scratch tensors of h's shape.

    tanh(softplus(h)) = n / (n + 2) with n = e^h (e^h + 2), computed as m / (m + 1) with m = n / 2 = e^h + e^2h / 2:
    one exp and five cheap passes, ~2x faster on CPU than F.mish, whose log1p is slow there. exp's input is clamped at
    20, where the ratio is 1 to fp32 precision (as it is for every larger h)."""
    torch.clamp(h, max=20.0, out=e).exp_()
    torch.addcmul(e, e, e, value=0.5, out=d)  # m
    torch.add(d, 1.0, out=e)  # m + 1
    return h.mul_(torch.div(d, e, out=d))  # ratio first: h * m would overflow for |h| > 1e21


def mlp_block(net: nn.Sequential, h: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """net(h) without autograd for one block of rows, net a sequence of Linear and Mish modules: the hidden Linears
    write into scratch[0] / scratch[1] (the one not holding h), Mish works in place with scratch[2:] as temporaries
    (mish_ on CPU, F.mish elsewhere). scratch: [4, >= len(h), H]; a leading Mish overwrites h."""
    bufs = scratch[:, : len(h)]
    for m in net:
        if isinstance(m, nn.Mish):
            h = mish_(h, bufs[2], bufs[3]) if h.device.type == "cpu" else F.mish(h, inplace=True)
        elif m is net[-1]:  # the output layer: a fresh [rows, out] tensor
            h = torch.addmm(m.bias, h, m.weight.t())
        else:
            out = bufs[1] if h.data_ptr() == bufs[0].data_ptr() else bufs[0]
            h = torch.addmm(m.bias, h, m.weight.t(), out=out)
    return h


def block_size(x: torch.Tensor) -> int:
    """Rows per block: BLOCK_ROWS on CPU; all rows at once on an accelerator (blocks would only add launches)."""
    return BLOCK_ROWS if x.device.type == "cpu" else max(len(x), 1)


@torch.no_grad()
def reverse_chain(denoiser: Denoiser, schedule: DDPMSchedule, obs: torch.Tensor, x: torch.Tensor,
                  noise: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Runs x_T -> x_0 (no autograd). obs: [N, S]; x: [N, A] = x_T; noise: [T, N, A], noise[t] is added at step t > 0.

    Each step: x0_hat = clip(x/sqrt(abar_t) - eps * sqrt(1/abar_t - 1), -1, 1), then the posterior mean
    c1_t x0_hat + c2_t x_t plus posterior_std_t * noise[t], with no noise at the last step (t = 0). The rows are
    independent, so the torch path runs the whole chain one block of rows at a time (see BLOCK_ROWS)."""
    temb = denoiser.time_mlp(denoiser.time_features)  # [T, E], once per chain
    if backend == "triton":
        import kernels

        layers = [(m.weight, m.bias) for m in denoiser.net if isinstance(m, nn.Linear)]
        return kernels.reverse_chain(layers, obs, x, temb, schedule.betas, "xts", noise=noise, clip=1.0)
    first, rest = denoiser.net[0], denoiser.net[1:]
    w_x, w_temb, w_obs = first.weight.split([x.shape[1], temb.shape[1], obs.shape[1]], dim=1)
    obs_proj = F.linear(obs, w_obs, first.bias)  # [N, H]: the state part of layer 1, hoisted out of the loop
    temb_proj = F.linear(temb, w_temb)  # [T, H]
    rows = block_size(x)
    scratch = x.new_empty(4, min(rows, len(x)), first.out_features)
    out = torch.empty_like(x)
    for start in range(0, len(x), rows):
        block = slice(start, start + rows)
        xb, obs_b = x[block], obs_proj[block]
        for t in reversed(range(schedule.T)):
            recip, recipm1, coef1, coef2, std = schedule.steps[t]
            h = torch.addmm(obs_b, xb, w_x.t(), out=scratch[0, : len(xb)]).add_(temb_proj[t])  # layer 1, [rows, H]
            eps = mlp_block(rest, h, scratch)
            x0 = (recip * xb - recipm1 * eps).clamp(-1.0, 1.0)
            xb = coef1 * x0 + coef2 * xb
            if t > 0:
                xb = xb + std * noise[t, block]
        out[block] = xb
    return out


@torch.no_grad()
def min_q(qf1: QNetwork, qf2: QNetwork, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """min(Q1, Q2)(obs, actions) without autograd, block by block as in reverse_chain: [N, S], [N, A] -> [N]."""
    rows = block_size(obs)
    scratch = obs.new_empty(4, min(rows, len(obs)), qf1.net[0].out_features)
    out = obs.new_empty(len(obs))
    for start in range(0, len(obs), rows):
        block = slice(start, start + rows)
        inp = torch.cat([obs[block], actions[block]], -1)
        q1 = mlp_block(qf1.net, inp, scratch)
        out[block] = torch.min(q1, mlp_block(qf2.net, inp, scratch)).squeeze(-1)
    return out


@torch.no_grad()
def sample_actions(denoiser: Denoiser, qf1: QNetwork, qf2: QNetwork, schedule: DDPMSchedule, obs: torch.Tensor,
                   num_samples: int, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Best of `num_samples` diffusion samples per state by min(Q1, Q2): [B, S] -> actions [B, A] in [-1, 1] and the
    min-Q of every candidate [B, num_samples] (the official `Diffusion.sample` / `sample_n` with chosen = 1)."""
    batch, act_dim = obs.shape[0], denoiser.act_dim
    obs_rep = obs.repeat_interleave(num_samples, 0)  # [B*K, S], candidates of a state are contiguous
    x = torch.randn(batch * num_samples, act_dim, device=obs.device)  # x_T ~ N(0, I)
    noise = torch.randn(schedule.T, batch * num_samples, act_dim, device=obs.device)
    actions = reverse_chain(denoiser, schedule, obs_rep, x, noise, backend).clamp(-1.0, 1.0)
    q = min_q(qf1, qf2, obs_rep, actions).view(batch, num_samples)
    best = actions.view(batch, num_samples, act_dim)[torch.arange(batch, device=obs.device), q.argmax(1)]
    return best, q


def q_weights(q: torch.Tensor, transform: str, running_mean: torch.Tensor | float = 0.0,
              running_std: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Weight of the kept sample of each state (official `agent/q_transform.py`, defaults q_neg=0, cut=1, beta=1).

    q: [B, K] min-Q of the K samples of a state; the kept one is the argmax. running_mean/std: the running
    statistics of all sampled Q values (used by qexpn, qcut0n, qcut1n). Returns [B], all >= 0."""
    q_best = q.max(1).values
    if transform == "qadv":  # advantage of the best sample over the mean of the K: >= 0 by construction
        return (q_best - q.mean(1)).clamp(min=0.0)
    if transform == "qrelu":
        return q_best.clamp(min=0.0)
    if transform == "qcut":
        return q_best.clamp(min=1.0)
    if transform == "qexpn":
        return torch.exp(((q_best - running_mean) / running_std).clamp(-8.0, 8.0))
    if transform in ("qcut0n", "qcut1n"):  # the official code divides by running_std in a comment only
        return (q_best - running_mean).clamp(min=0.0 if transform == "qcut0n" else 1.0)
    raise ValueError(f"unknown q_transform {transform!r}")


def entropy_weight(step: int, decay_steps: int, initial: float, final: float) -> float:
    """omega = initial * (1 - step / decay_steps), floored at final (official `main.py` L193, num_steps there)."""
    return min(initial, max(final, initial - initial * step / decay_steps))


def actor_rows(obs: torch.Tensor, best_actions: torch.Tensor, weights: torch.Tensor, omega: float,
               num_uniform: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of the actor loss: the B kept samples with weight w(s), then num_uniform blocks of B uniform actions
    in [-1, 1]^A with weight omega * w(s). obs [B, S], best_actions [B, A], weights [B] -> obs [(1 + N_e) B, S],
    actions [(1 + N_e) B, A], weights [(1 + N_e) B]; row j*B + b belongs to state b (the official layout).
    omega == 0 (a Python float, no sync) drops the uniform rows, as the official `if entropy_alpha > 0`."""
    if omega == 0:
        return obs, best_actions, weights
    uniform = 2.0 * torch.rand(num_uniform * len(obs), best_actions.shape[1], device=obs.device) - 1.0
    return (obs.repeat(1 + num_uniform, 1), torch.cat([best_actions, uniform]),
            torch.cat([weights, omega * weights.repeat(num_uniform)]))


def q_weighted_loss(eps_pred: torch.Tensor, eps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The official WeightedL2: plain mean over [N, A] of weights[:, None] * (eps_pred - eps)^2, where the N rows are
    the B kept samples followed by the num_uniform * B uniform-action rows (so the mean divides by (B + N_e B) * A)."""
    return (weights[:, None] * (eps_pred - eps) ** 2).mean()


def update(args: Args, actor: Denoiser, actor_target: Denoiser, qf1: QNetwork, qf2: QNetwork, qf1_target: QNetwork,
           qf2_target: QNetwork, q_optimizer: torch.optim.Optimizer, actor_optimizer: torch.optim.Optimizer,
           q_stats: torch.Tensor, schedule: DDPMSchedule, rb: ReplayBuffer, alpha: float,
           backend: str = "torch") -> dict[str, torch.Tensor]:
    """One QVPO gradient step (official `QVPO.train`, one iteration): a critic step on one replay batch, a Q-weighted
    VLO actor step on a second batch, then the EMA of the actor and the critics. Updates q_stats in place.

    Returns the step's intermediate tensors (detached), for logging and for benchmarks/parity/qvpo.py."""
    b_obs, b_next_obs, b_actions, b_rewards, b_dones = rb.sample(args.batch_size)
    with torch.no_grad():  # TD target: the EMA actor's best of target_samples by the target critics
        # the kept candidate's min-Q is the max over the candidates: no second target-critic pass needed
        _, next_q = sample_actions(actor_target, qf1_target, qf2_target, schedule, b_next_obs, args.target_samples,
                                   backend)
        target_q = next_q.max(1).values
        td_target = b_rewards + args.gamma * (1.0 - b_dones) * target_q  # [B]

    qf1_a_values, qf2_a_values = qf1(b_obs, b_actions), qf2(b_obs, b_actions)
    qf1_loss, qf2_loss = F.mse_loss(qf1_a_values, td_target), F.mse_loss(qf2_a_values, td_target)
    q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()
    if args.max_grad_norm > 0:
        nn.utils.clip_grad_norm_([*qf1.parameters(), *qf2.parameters()], args.max_grad_norm)
    q_optimizer.step()

    # Q-weighted VLO on a fresh batch: per state keep the best of train_samples online-actor samples, scored by the
    # just-updated critics, with weight w(s); append num_uniform uniform actions per state, weight omega * w(s) (the
    # entropy term); one denoising loss over all (1 + num_uniform) * B rows.
    p_obs = rb.sample(args.batch_size)[0]  # [B, S]
    with torch.no_grad():
        # best_actions [B, A]; q [B, K]: min-Q of all K = train_samples candidates
        best_actions, q = sample_actions(actor, qf1, qf2, schedule, p_obs, args.train_samples, backend)
        q_stats.lerp_(torch.stack([q.mean(), q.std()]), 0.001)  # official running_q_mean / running_q_std
        weights = q_weights(q, args.q_transform, q_stats[0], q_stats[1])  # [B]
        rows_obs, x0, rows_w = actor_rows(p_obs, best_actions, weights, alpha, args.num_uniform)
        t = torch.randint(0, schedule.T, (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        x_t = schedule.q_sample(x0, t, eps)
    eps_pred = actor(rows_obs, x_t, t)  # [(1 + N_e) B, A]
    actor_loss = q_weighted_loss(eps_pred, eps, rows_w)
    actor_optimizer.zero_grad()
    actor_loss.backward()
    if args.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
    actor_optimizer.step()
    with torch.no_grad():  # EMA of the actor and the critics, every update
        online = [*actor.parameters(), *qf1.parameters(), *qf2.parameters()]
        targets = [*actor_target.parameters(), *qf1_target.parameters(), *qf2_target.parameters()]
        torch._foreach_lerp_(targets, online, args.tau)
    return {"next_q": next_q, "td_target": td_target, "qf1_values": qf1_a_values.detach(),
            "qf2_values": qf2_a_values.detach(), "qf1_loss": qf1_loss.detach(), "qf2_loss": qf2_loss.detach(), "q": q,
            "best_actions": best_actions, "weights": weights, "rows_obs": rows_obs, "rows_actions": x0,
            "rows_weights": rows_w, "x_t": x_t, "eps_pred": eps_pred.detach(), "actor_loss": actor_loss.detach()}


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


def resolve_backend(choice: str, device: torch.device, hidden_dim: int, precision: str = "ieee") -> str:
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
    if args.entropy_decay_steps is None:  # fixed at the first start and saved, so a longer resumed run keeps it
        args.entropy_decay_steps = checkpoint["args"]["total_timesteps"] if checkpoint else args.total_timesteps
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
    actor = Denoiser(obs_dim, act_dim, args.hidden_dim, args.time_dim, args.diffusion_steps).to(device)
    actor_target = Denoiser(obs_dim, act_dim, args.hidden_dim, args.time_dim, args.diffusion_steps).to(device)
    qf1, qf2 = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device), QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    qf1_target = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    qf2_target = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    actor_target.load_state_dict(actor.state_dict())
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr, eps=args.adam_eps)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, eps=args.adam_eps)
    # running mean and std of the sampled Q values (official alpha_mean = alpha_std = 0.001), for qexpn / qcut*n
    q_stats = torch.tensor([0.0, 1.0], device=device)
    schedule = DDPMSchedule(cosine_beta_schedule(args.diffusion_steps), device)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)

    def act(denoiser: Denoiser, obs: torch.Tensor, num_samples: int) -> torch.Tensor:
        return sample_actions(denoiser, qf1, qf2, schedule, obs, num_samples, backend)[0]

    # everything a checkpoint holds besides counters, Q statistics and RNG states (the replay buffer included)
    stateful = {"actor": actor, "actor_target": actor_target, "qf1": qf1, "qf2": qf2, "qf1_target": qf1_target,
                "qf2_target": qf2_target, "q_optimizer": q_optimizer, "actor_optimizer": actor_optimizer, "rb": rb}
    global_step, update_step, eval_history = 0, 0, []
    if checkpoint:
        for name, module in stateful.items():
            module.load_state_dict(checkpoint[name])
        q_stats.copy_(checkpoint["q_stats"])
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
        # the online actor, best of eval_samples by the online critics, DDPM noise kept (official eval=True)
        returns = evaluate(eval_envs, lambda obs: act(actor, obs, args.eval_samples), args.seed + 10_000, device)
        eval_history.append({"step": global_step, "mean_return": float(returns.mean()), "std_return": float(returns.std())})
        writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
        writer.add_scalar("eval/episodic_return_std", returns.std(), global_step)
        print(f"eval  step {global_step:>10,} | return {returns.mean():10.2f} +- {returns.std():.2f} ({len(returns)} episodes)")

    def checkpoint_state() -> dict:
        return {**{k: m.state_dict() for k, m in stateful.items()}, "q_stats": q_stats.cpu(),
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
        alpha = entropy_weight(global_step, args.entropy_decay_steps, args.entropy_alpha, args.entropy_alpha_min)
        if rb.size < args.learning_starts:
            actions = envs.action_space.sample()
        else:
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
            # the online actor, best of behavior_samples by the online critics, no extra noise (already in [-1, 1])
            actions = act(actor, obs_t, args.behavior_samples).cpu().numpy()

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
            out = update(args, actor, actor_target, qf1, qf2, qf1_target, qf2_target, q_optimizer, actor_optimizer,
                         q_stats, schedule, rb, alpha, backend)
            update_step += 1
            losses.update(qf1_loss=out["qf1_loss"], qf2_loss=out["qf2_loss"], qf1_values=out["qf1_values"].mean(),
                          qf2_values=out["qf2_values"].mean(), actor_loss=out["actor_loss"],
                          q_weight=out["weights"].mean(), q_best=out["q"].max(1).values.mean(), q_samples=out["q"].mean())

        # TRY NOT TO MODIFY: logging, evaluation and checkpoints at fixed env-step intervals; a status line also
        # every `status_interval` seconds, so that a slow run (Ant on a CPU: ~5 env steps/s) shows it is alive
        log_now, now = global_step // args.log_frequency > prev_step // args.log_frequency, time.time()
        if log_now or now - last_log[1] >= args.status_interval:
            values = {k: v.item() for k, v in losses.items()}
            if log_now:  # TensorBoard scalars stay step-based
                writer.add_scalar("charts/SPS", int((global_step - start_step) / (now - start_time)), global_step)
                writer.add_scalar("losses/alpha", alpha, global_step)  # omega, the entropy-row weight
                for k, v in values.items():
                    writer.add_scalar(f"losses/{k}", v, global_step)
                if values:
                    writer.add_scalar("losses/qf_loss", (values["qf1_loss"] + values["qf2_loss"]) / 2, global_step)
            sps, last_log = (global_step - last_log[0]) / max(now - last_log[1], 1e-9), (global_step, now)  # recent
            eta = format_duration((args.total_timesteps - global_step) / sps) if sps > 0 else "?"
            loss_text = " | ".join(f"{k} {v:.4g}" for k, v in values.items() if k in ("qf1_loss", "actor_loss"))
            print(f"step {global_step:>10,} | SPS {sps:>7.1f} | ETA {eta} | return {last_return:10.2f} | omega {alpha:.4f}"
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
