# Docs: docs/diffusion_ql.md
"""Diffusion-QL: diffusion policies as an expressive policy class for offline RL, in one file, on Minari datasets.

Paper: Wang, Hunt, Zhou, "Diffusion Policies as an Expressive Policy Class for Offline Reinforcement Learning"
(ICLR 2023; arXiv 2208.06193). Official PyTorch code: Zhendong-Wang/Diffusion-Policies-for-Offline-RL @ d871f5c; its
per-task table is `OFFICIAL_TASKS` below.

Deviations from the official code (docs/diffusion_ql.md gives the reasons):
1. Data come from Minari, not `d4rl.qlearning_dataset`; actions are rescaled from the dataset's Box to [-1, 1].
2. Evaluation episodes run in lock-step, one env each, seeded seed+100+i (official: one env, in sequence).
3. Speed with the same math: hoisted first layer, no discarded gradients, torch.compile (`--compile`), fused Adam.
4. DDPM coefficients are computed in float64 and cast to float32 (official: float32; ~1e-7 relative).
5. Dict observations (antmaze, kitchen) are flattened in sorted key order at every level.
6. Datasets with no official twin get the preset of their family (locomotion, antmaze, Adroit, kitchen).
7. `--reward-tune normalize` on constant rewards gives 0 with a warning (official: NaN).
8. The default seed is 1, CleanRL's convention (official: 0).
9. AntMaze: a reward-1 step ends the bootstrap, as D4RL's terminals (Minari's antmaze never terminates; `--goal-terminals`).
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

# The official per-task table (DQL main.py): actor lr, eta, max_q_backup, reward_tune, epochs of 1000 gradient
# steps, grad-norm clip gn. Eval episodes: 10 for the gym (-v2) tasks, 100 for the others.
OFFICIAL_TASKS = {
    "halfcheetah-medium-v2": (3e-4, 1.0, False, "no", 2000, 9.0),
    "hopper-medium-v2": (3e-4, 1.0, False, "no", 2000, 9.0),
    "walker2d-medium-v2": (3e-4, 1.0, False, "no", 2000, 1.0),
    "halfcheetah-medium-replay-v2": (3e-4, 1.0, False, "no", 2000, 2.0),
    "hopper-medium-replay-v2": (3e-4, 1.0, False, "no", 2000, 4.0),
    "walker2d-medium-replay-v2": (3e-4, 1.0, False, "no", 2000, 4.0),
    "halfcheetah-medium-expert-v2": (3e-4, 1.0, False, "no", 2000, 7.0),
    "hopper-medium-expert-v2": (3e-4, 1.0, False, "no", 2000, 5.0),
    "walker2d-medium-expert-v2": (3e-4, 1.0, False, "no", 2000, 5.0),
    "antmaze-umaze-v0": (3e-4, 0.5, False, "cql_antmaze", 1000, 2.0),
    "antmaze-umaze-diverse-v0": (3e-4, 2.0, True, "cql_antmaze", 1000, 3.0),
    "antmaze-medium-play-v0": (1e-3, 2.0, True, "cql_antmaze", 1000, 2.0),
    "antmaze-medium-diverse-v0": (3e-4, 3.0, True, "cql_antmaze", 1000, 1.0),
    "antmaze-large-play-v0": (3e-4, 4.5, True, "cql_antmaze", 1000, 10.0),
    "antmaze-large-diverse-v0": (3e-4, 3.5, True, "cql_antmaze", 1000, 7.0),
    "pen-human-v1": (3e-5, 0.15, False, "normalize", 1000, 7.0),
    "pen-cloned-v1": (3e-5, 0.1, False, "normalize", 1000, 8.0),
    "kitchen-complete-v0": (3e-4, 0.005, False, "no", 250, 9.0),
    "kitchen-partial-v0": (3e-4, 0.005, False, "no", 1000, 10.0),
    "kitchen-mixed-v0": (3e-4, 0.005, False, "no", 1000, 10.0),
}
# Named presets: the official row of one representative task per family, used for datasets with no official twin.
PRESETS = {"locomotion": "hopper-medium-v2", "antmaze": "antmaze-medium-diverse-v0", "pen": "pen-human-v1",
           "kitchen": "kitchen-partial-v0"}
# --preset auto: the family of a Minari env name (the id's part before the last "/"); any other env is locomotion.
# The official code's only Adroit task (pen) stands for the whole Adroit suite: door, hammer and relocate get its row.
FAMILIES = {"antmaze": "antmaze", "pen": "pen", "door": "pen", "hammer": "pen", "relocate": "pen",
            "kitchen": "kitchen"}


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
    """write runs/{run_name}/checkpoint.pt every `checkpoint_frequency` gradient steps and at the end"""
    resume: str | None = None
    """path of a checkpoint.pt to continue from (flags given with it override the saved ones)"""
    checkpoint_frequency: int = 50_000
    """gradient steps between checkpoints (with --save-model)"""
    dataset_id: str = "mujoco/hopper/medium-v0"
    """Minari dataset id (Box observations and actions); looked up under MINARI_DATASETS_PATH first"""
    goal_terminals: bool | None = None
    """steps with reward 1 end the bootstrap (not_done = 0), as the `terminals` of D4RL's antmaze data that the official
    code trained on (Minari's antmaze episodes never terminate, so the goal would be worth a discounted sum of goal
    rewards instead of one); None: on for antmaze datasets, off otherwise"""
    total_timesteps: int | None = None
    """number of gradient steps (None: the preset's epochs x 1000, e.g. 2M for locomotion)"""
    learning_starts: int = 0
    """unused offline (the whole dataset is there from step 0); kept for the common flag set, must be 0"""
    num_envs: int = 1
    """unused offline (evaluation runs its `eval_episodes` envs in lock-step); kept for the common flag set, must be 1"""
    batch_size: int = 256
    """the batch size of transitions sampled uniformly (with replacement) from the dataset"""
    eval_frequency: int = 50_000
    """gradient steps between evaluations (official: every 50 epochs of 1000 steps)"""
    eval_episodes: int | None = None
    """episodes per evaluation (None: 10 for locomotion, 100 for antmaze, pen and kitchen, as the official code)"""
    diffusion_steps: int = 5
    """number of denoising steps T (VP schedule)"""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """reverse-chain backend: fused Triton kernels (kernels/), plain PyTorch, or auto (Triton only where kernels/
    records a measured GPU speed-up for this configuration, else PyTorch)"""
    precision: Literal["ieee", "tf32"] = "ieee"
    """float32 matmuls on a GPU, the fused chain's included (no effect on a CPU): ieee, as PyTorch computes them (the
    official runs), or tf32"""
    log_frequency: int = 1_000
    """gradient steps between status lines and TensorBoard loss scalars"""
    status_interval: float = 30.0
    """seconds of wall time between status lines (besides the one every `log_frequency` steps)"""

    # Algorithm specific arguments
    preset: str = "auto"
    """official hyper-parameters: auto (from the dataset id), locomotion, antmaze, pen, kitchen, or an official task
    name such as hopper-medium-v2; the five flags below override it one by one"""
    lr: float | None = None
    """learning rate of the diffusion actor (None: preset)"""
    eta: float | None = None
    """weight of the normalised Q term in the actor loss (None: preset)"""
    max_q_backup: bool | None = None
    """critic target = min over heads of the max over `max_q_backup_samples` EMA-actor actions (None: preset)"""
    reward_tune: Literal["no", "normalize", "cql_antmaze"] | None = None
    """reward transform: none, (r - mean) / std, or (r - 0.5) * 4 (None: preset)"""
    grad_norm: float | None = None
    """max gradient norm of actor and critic, <= 0 disables clipping (None: preset)"""
    critic_lr: float = 3e-4
    """learning rate of the critic (hard-coded 3e-4 in the official code for every task)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """Polyak coefficient of the target critic, every step"""
    ema_decay: float = 0.995
    """decay of the EMA actor that produces the critic-target actions"""
    ema_start: int = 1_000
    """gradient step from which the EMA actor is updated (before: it stays the initial actor)"""
    ema_frequency: int = 5
    """gradient steps between EMA updates"""
    max_q_backup_samples: int = 10
    """EMA-actor actions per next state with --max-q-backup"""
    lr_decay: bool = False
    """the official --lr_decay: cosine over T_max = epochs, stepped once per evaluation (so ~no decay)"""
    eval_candidates: int = 50
    """actions sampled per state at evaluation, one drawn by softmax of the target min-Q (1 = plain one sample)"""
    hidden_dim: int = 256
    """width of the 3 hidden layers of the denoiser and of the Q networks"""
    time_dim: int = 16
    """size of the sinusoidal time embedding"""
    compile: bool = True
    """torch.compile the critic and actor losses, forward and backward (with --kernels torch; ~1.5x faster steps on
    CPU; the first run compiles for ~1 min, later runs load inductor's cache); eager with a warning if it fails"""


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
    for name, value in vars(args).items():  # nan/inf pass `<`-checks (lr, eta, grad-norm, gamma, tau, ema-decay)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    positive = ["batch_size", "eval_frequency", "diffusion_steps", "log_frequency", "status_interval", "checkpoint_frequency",
                "ema_frequency", "max_q_backup_samples", "eval_candidates", "hidden_dim", "critic_lr"]
    for name in positive + [n for n in ("total_timesteps", "eval_episodes", "lr") if getattr(args, n) is not None]:
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.learning_starts != 0 or args.num_envs != 1:
        fail("--learning-starts and --num-envs are unused offline; leave them at 0 and 1")
    if args.preset != "auto" and args.preset not in PRESETS and args.preset not in OFFICIAL_TASKS:
        fail(f"unknown --preset {args.preset!r}; choose auto, {', '.join(PRESETS)} or an official task name "
             f"such as hopper-medium-v2")
    if not 0 < args.gamma <= 1 or not 0 < args.tau <= 1 or not 0 <= args.ema_decay < 1:
        fail(f"--gamma and --tau must be in (0, 1] and --ema-decay in [0, 1), got {args.gamma}, {args.tau}, "
             f"{args.ema_decay}")
    if args.eta is not None and args.eta < 0:
        fail(f"--eta must be >= 0, got {args.eta}")
    if not 0 <= args.seed < 2**32:  # np.random.seed's range
        fail(f"--seed must be in [0, 2**32) (numpy's seed range), got {args.seed}")
    if args.ema_start < 0:
        fail(f"--ema-start must be >= 0, got {args.ema_start}")
    if args.time_dim < 4 or args.time_dim % 2:
        fail(f"--time-dim must be an even number >= 4, got {args.time_dim}")
    if args.resume and not os.path.isfile(args.resume):
        fail(f"--resume: no checkpoint at {args.resume!r} (runs/<run_name>/checkpoint.pt is written by --save-model)")


# Flags that fix the shapes of the saved networks (the dataset fixes their input and output sizes): a resumed run must
# keep them.
SHAPE_ARGS = ("dataset_id", "hidden_dim", "time_dim", "diffusion_steps")


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
                 f"{saved[name]}; it fixes the saved networks' shapes, so leave it unset")


def env_name(dataset_id: str) -> str:
    """The env part of a Minari id, the component before the last "/": D4RL/pen/human-v2 -> pen ("" if none)."""
    parts = dataset_id.lower().split("/")
    return parts[-2] if len(parts) >= 2 else ""


def official_task(dataset_id: str) -> str | None:
    """The official (D4RL) task a Minari dataset id corresponds to, e.g. mujoco/hopper/medium-v0 -> hopper-medium-v2,
    D4RL/antmaze/umaze-diverse-v1 -> antmaze-umaze-diverse-v0, D4RL/pen/human-v2 -> pen-human-v1; else None."""
    env, name = env_name(dataset_id), dataset_id.lower().rsplit("/", 1)[-1].rsplit("-v", 1)[0]
    suffix = {"halfcheetah": "v2", "hopper": "v2", "walker2d": "v2", "antmaze": "v0", "pen": "v1", "kitchen": "v0"}
    task = f"{env}-{name}-{suffix[env]}" if env in suffix else None
    return task if task in OFFICIAL_TASKS else None


def resolve_preset(args: Args) -> tuple[Args, str]:
    """Fills every None hyper-parameter from the preset; returns the resolved args and the official row used."""
    if args.preset in OFFICIAL_TASKS:
        task = args.preset
    elif args.preset in PRESETS:
        task = PRESETS[args.preset]
    else:  # auto: the dataset's official twin, else the family preset of its env name, else locomotion
        task = official_task(args.dataset_id) or PRESETS[FAMILIES.get(env_name(args.dataset_id), "locomotion")]
    lr, eta, max_q_backup, reward_tune, epochs, grad_norm = OFFICIAL_TASKS[task]
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return replace(args, lr=pick(args.lr, lr), eta=pick(args.eta, eta), max_q_backup=pick(args.max_q_backup, max_q_backup),
                   reward_tune=pick(args.reward_tune, reward_tune), grad_norm=pick(args.grad_norm, grad_norm),
                   total_timesteps=pick(args.total_timesteps, epochs * 1000),
                   eval_episodes=pick(args.eval_episodes, 10 if task.endswith("-v2") else 100),
                   goal_terminals=pick(args.goal_terminals, env_name(args.dataset_id) == "antmaze")), task


def load_dataset(dataset_id: str):
    """Local Minari dataset first; a download only where it can work (huggingface_hub importable, not offline)."""
    import importlib.util

    import minari

    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        pass
    except Exception as e:  # a malformed id or a broken local copy
        fail(f"cannot load Minari dataset {dataset_id!r}: {type(e).__name__}: {e}")
    root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    how = f"`minari download {dataset_id}` (needs `pip install \"minari[hf]\"` and the internet) or set MINARI_DATASETS_PATH"
    if importlib.util.find_spec("huggingface_hub") is None or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        fail(f"dataset {dataset_id!r} is not under {root} and cannot be downloaded here; get it with {how}")
    try:
        print(f"{dataset_id} is not under {root}; downloading it from the Minari hub ...", flush=True)
        minari.download_dataset(dataset_id)
        return minari.load_dataset(dataset_id)
    except Exception as e:
        fail(f"dataset {dataset_id!r} is not under {root} and the download failed ({type(e).__name__}); get it with {how}")


def rescale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Affine map of the action Box [low, high] onto [-1, 1] (the identity for every official task), [N, A]."""
    return 2.0 * (actions - low) / (high - low) - 1.0


def dataset_tensors(dataset, reward_tune: str, device: torch.device,
                    goal_terminals: bool = False) -> dict[str, torch.Tensor]:
    """All transitions of the dataset as device tensors: obs/next_obs [N, S], actions [N, A] rescaled from the
    action Box to [-1, 1] (not clipped: the official code trains on the stored actions as they are), rewards [N]
    (after the reward transform) and not_dones [N] (0 where the episode terminated and, with `goal_terminals`, where
    the raw reward is 1: D4RL's antmaze `terminals`)."""
    obs, next_obs, actions, rewards, terminals = [], [], [], [], []
    for ep in dataset.iterate_episodes():
        ep_obs = flatten_obs(ep.observations, dataset.observation_space)  # [T+1, S]
        obs.append(ep_obs[:-1]), next_obs.append(ep_obs[1:]), actions.append(ep.actions)
        rewards.append(ep.rewards), terminals.append(ep.terminations)
    actions = rescale_actions(np.concatenate(actions), dataset.action_space.low, dataset.action_space.high)
    raw_rewards = np.concatenate(rewards)
    terminals = np.concatenate(terminals) | (goal_terminals & (raw_rewards == 1.0))  # [N] bool
    rewards = torch.as_tensor(raw_rewards, dtype=torch.float32)
    if reward_tune == "normalize" and rewards.numel() > 1 and rewards.max() > rewards.min():
        rewards = (rewards - rewards.mean()) / rewards.std()  # pen: torch's unbiased std, as the official Data_Sampler
    elif reward_tune == "normalize":  # constant: the official 0/0 would make every reward NaN
        print(f"{SCRIPT}: warning: the rewards of {dataset.spec.dataset_id} are constant; --reward-tune normalize "
              "makes them all 0", file=sys.stderr, flush=True)
        rewards = torch.zeros_like(rewards)
    elif reward_tune == "cql_antmaze":
        rewards = (rewards - 0.5) * 4.0
    data = {"obs": np.concatenate(obs), "next_obs": np.concatenate(next_obs), "actions": actions,
            "not_dones": 1.0 - terminals.astype(np.float32)}
    data = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in data.items()}
    return {k: v.to(device) for k, v in {**data, "rewards": rewards}.items()}


def obs_leaves(space: gym.spaces.Space) -> list[gym.spaces.Space]:
    """The leaf spaces of an observation space in flattening order: nested Dicts in sorted key order at every level."""
    if isinstance(space, gym.spaces.Dict):
        return [leaf for key in sorted(space.spaces) for leaf in obs_leaves(space.spaces[key])]
    return [space]


def flatten_obs(obs, space: gym.spaces.Space) -> np.ndarray:
    """[..., S] float array of a Box observation, or of a Dict of them, nested Dicts included (antmaze: observation +
    goals; kitchen: goals that are Dicts keyed by task), concatenated in sorted key order at every level (the order of
    `obs_leaves`), for the dataset ([T+1, d] per leaf) and the eval env ([d] per leaf) alike."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_obs(obs[key], space.spaces[key]) for key in sorted(space.spaces)], axis=-1)
    return np.asarray(obs, dtype=np.float32)


def check_spaces(dataset, dataset_id: str) -> None:
    obs_space, act_space = dataset.observation_space, dataset.action_space
    for what, space, leaves in (("observation", obs_space, obs_leaves(obs_space)), ("action", act_space, [act_space])):
        if not leaves or not all(isinstance(leaf, gym.spaces.Box) and len(leaf.shape) == 1 for leaf in leaves):
            fail(f"{dataset_id} has the {what} space {space}; {SCRIPT} needs flat Box spaces (observations may be a "
                 "Dict of flat Boxes, nested Dicts included)")
    if not (np.all(np.isfinite(act_space.low)) and np.all(np.isfinite(act_space.high))):
        fail(f"{dataset_id} has unbounded actions; the diffusion policy needs finite Box bounds")
    if not np.all(act_space.high > act_space.low):
        fail(f"{dataset_id} has an action dimension with high <= low ({act_space}); it cannot be rescaled to [-1, 1]")


def recover_eval_env(dataset, **kwargs) -> gym.Env:
    """The dataset's eval env (kwargs go to gym.make), or a one-line error."""
    try:
        return dataset.recover_environment(eval_env=True, **kwargs)
    except Exception as e:  # unregistered/unimportable entry point, missing MuJoCo, ...
        fail(f"cannot recover the eval env of {dataset.spec.dataset_id}: {type(e).__name__}: {e}")


def make_env(dataset, seed: int, video_dir: str | None = None):
    """A thunk that builds one evaluation env (the dataset's eval env) acting in [-1, 1]."""

    def thunk() -> gym.Env:
        env = recover_eval_env(dataset, **({"render_mode": "rgb_array"} if video_dir else {}))
        if video_dir:
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, disable_logger=True)
        if isinstance(env.observation_space, gym.spaces.Dict):  # same flattening as the dataset's observations
            size = sum(int(np.prod(s.shape)) for s in obs_leaves(env.observation_space))
            box = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
            env = gym.wrappers.TransformObservation(env, lambda o, space=env.observation_space: flatten_obs(o, space), box)
        ones = np.ones(env.action_space.shape, dtype=np.float32)
        env = gym.wrappers.RescaleAction(env, -ones, ones)
        env.action_space.seed(seed)
        return env

    return thunk


def check_video(dataset) -> None:
    """--capture-video renders only at the first evaluation: fail now, not hours into the run, if it cannot."""
    try:
        import moviepy  # noqa: F401
    except ImportError:
        fail("--capture-video needs moviepy: pip install moviepy (headless MuJoCo also needs MUJOCO_GL=egl)")
    env = recover_eval_env(dataset, render_mode="rgb_array")
    env_id = env.spec.id if env.spec is not None else dataset.spec.dataset_id
    try:
        env.reset(seed=0)
        env.render()
        env.close()
    except Exception as e:  # no OpenGL context, no pygame, ...
        fail(f"--capture-video: {env_id} cannot render ({type(e).__name__}: {e}); on a headless machine set "
             "MUJOCO_GL=egl (or osmesa)")


def mish_one_exp(z: torch.Tensor) -> torch.Tensor:
    """mish(z) = z tanh(softplus(z)) with one exp: n = e^z (e^z + 2) gives tanh(log(1 + e^z)) = n / (n + 2). z is
    clamped at 20 so n stays finite in fp32 (mish(z) = z there to fp32 precision)."""
    e = torch.exp(z.clamp(max=20.0))
    n = e * (e + 2.0)
    return torch.where(z > 20.0, z, z * n / (n + 2.0))


class Mish(nn.Module):
    """F.mish in eager mode; the one-exp formula inside torch.compile (--compile), where inductor fuses it, and its
    derivative, with the neighbouring bias add (F.mish would decompose into exp + log1p + tanh, ~3x slower on CPU)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return mish_one_exp(z) if torch.compiler.is_compiling() else F.mish(z)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """in -> 3 x [Linear(hidden), Mish] -> Linear(out), PyTorch default init (as the official code)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), Mish(), nn.Linear(hidden_dim, hidden_dim), Mish(),
                         nn.Linear(hidden_dim, hidden_dim), Mish(), nn.Linear(hidden_dim, out_dim))


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, hidden_dim, 1)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)  # [B]


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Official SinusoidalPosEmb of the integer step t: [sin(t f_k), cos(t f_k)], f_k = exp(-k ln(1e4) / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)  # [len(t), dim]


class Denoiser(nn.Module):
    """Noise prediction eps_theta(x_t, t, s): MLP on [x_t, temb, s], temb = MLP(sinusoidal(t)) (16 -> 32 -> 16)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, time_dim: int, diffusion_steps: int):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, 2 * time_dim), Mish(), nn.Linear(2 * time_dim, time_dim))
        self.net = mlp(act_dim + time_dim + obs_dim, hidden_dim, act_dim)
        self.register_buffer("time_features", sinusoidal_embedding(torch.arange(diffusion_steps), time_dim))  # [T, E]

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(self.time_features[t])  # t: [B] integer steps
        return self.net(torch.cat([x, temb, obs], -1))


def vp_beta_schedule(diffusion_steps: int, b_min: float = 0.1, b_max: float = 10.0) -> torch.Tensor:
    """Official `vp_beta_schedule`: beta_t = 1 - exp(-b_min/T - (b_max - b_min)(2t - 1) / (2T^2)), t = 1..T."""
    t = torch.arange(1, diffusion_steps + 1, dtype=torch.float64)
    T = diffusion_steps
    return 1.0 - torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T**2)


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
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
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
    """Runs x_T -> x_0, differentiably. obs: [N, S]; x: [N, A] = x_T; noise: [T, N, A], noise[t] is added at step t > 0.

    Each step: x0_hat = clip(x/sqrt(abar_t) - eps * sqrt(1/abar_t - 1), -1, 1), then the posterior mean
    c1_t x0_hat + c2_t x_t plus posterior_std_t * noise[t], with no noise at the last step (t = 0). Not clipped at
    the end (the caller clips, as the official `sample`)."""
    temb = denoiser.time_mlp(denoiser.time_features)  # [T, E], once per chain
    if backend == "triton":
        import kernels

        layers = [(m.weight, m.bias) for m in denoiser.net if isinstance(m, nn.Linear)]
        return kernels.reverse_chain(layers, obs, x, temb, schedule.betas, "xts", noise=noise, clip=1.0)
    first, rest = denoiser.net[0], denoiser.net[1:]
    w_x, w_temb, w_obs = first.weight.split([x.shape[1], temb.shape[1], obs.shape[1]], dim=1)
    obs_proj = F.linear(obs, w_obs, first.bias)  # [N, H]: the state part of layer 1, hoisted out of the loop
    temb_proj = F.linear(temb, w_temb)  # [T, H]
    for t in reversed(range(schedule.T)):
        recip, recipm1, coef1, coef2, std = schedule.steps[t]
        eps = rest(torch.addmm(obs_proj + temb_proj[t], x, w_x.t()))
        x0 = (recip * x - recipm1 * eps).clamp(-1.0, 1.0)
        x = coef1 * x0 + coef2 * x
        if t > 0:
            x = x + std * noise[t]
    return x


def draw_noise(schedule: DDPMSchedule, n: int, act_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The randomness of n reverse chains: x_T [n, A] and the per-step noise [T, n, A], both N(0, I)."""
    return torch.randn(n, act_dim, device=device), torch.randn(schedule.T, n, act_dim, device=device)


def sample_actions(denoiser: Denoiser, schedule: DDPMSchedule, obs: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """One action per state [N, S] -> [N, A] in [-1, 1]: x_T ~ N(0, I), the reverse chain, then a final clip."""
    x, noise = draw_noise(schedule, obs.shape[0], denoiser.act_dim, obs.device)
    return reverse_chain(denoiser, schedule, obs, x, noise, backend).clamp(-1.0, 1.0)


def bc_loss(denoiser: Denoiser, schedule: DDPMSchedule, obs: torch.Tensor, actions: torch.Tensor, t: torch.Tensor,
            eps: torch.Tensor) -> torch.Tensor:
    """Diffusion behaviour cloning: mean (eps_theta(x_t, t, s) - eps)^2; the caller draws t ~ U{0..T-1} [B] and eps
    ~ N(0, I) [B, A]."""
    return F.mse_loss(denoiser(schedule.q_sample(actions, t, eps), t, obs), eps)


def q_term(q1_new: torch.Tensor, q2_new: torch.Tensor, use_q1: bool) -> torch.Tensor:
    """The official Q term: -mean(Q_i(s, a_pi)) / mean|Q_j(s, a_pi)| with head i picked at random, j the other head,
    and the normaliser detached (no gradient through it)."""
    q_used, q_other = (q1_new, q2_new) if use_q1 else (q2_new, q1_new)
    return -q_used.mean() / q_other.abs().mean().detach()


def critic_losses(nets: dict[str, nn.Module], schedule: DDPMSchedule, batch: dict[str, torch.Tensor],
                  x: torch.Tensor, noise: torch.Tensor, gamma: float, backup_samples: int,
                  backend: str) -> tuple[torch.Tensor, ...]:
    """TD losses of both Q heads. Target: the min over the target heads of Q(s', a') with a' from the EMA actor's
    reverse chain (x: [B*K, A], noise: [T, B*K, A]); with K = backup_samples > 1 (max-Q backup) each head first takes
    the max over its K actions per s'. Returns (qf1_loss, qf2_loss, mean Q1(s, a), mean Q2(s, a))."""
    with torch.no_grad():
        next_obs = batch["next_obs"].repeat_interleave(backup_samples, 0)  # [B*K, S]
        next_actions = reverse_chain(nets["ema_actor"], schedule, next_obs, x, noise, backend).clamp(-1.0, 1.0)
        target_q = torch.min(nets["qf1_target"](next_obs, next_actions).view(-1, backup_samples).max(1).values,
                             nets["qf2_target"](next_obs, next_actions).view(-1, backup_samples).max(1).values)
        td_target = batch["rewards"] + batch["not_dones"] * gamma * target_q  # [B]
    qf1_a_values, qf2_a_values = nets["qf1"](batch["obs"], batch["actions"]), nets["qf2"](batch["obs"], batch["actions"])
    return (F.mse_loss(qf1_a_values, td_target), F.mse_loss(qf2_a_values, td_target), qf1_a_values.detach().mean(),
            qf2_a_values.detach().mean())


def actor_losses(nets: dict[str, nn.Module], schedule: DDPMSchedule, batch: dict[str, torch.Tensor], t: torch.Tensor,
                 eps: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, use_qf1: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(BC loss, Q term) of the actor. The Q term backpropagates through the whole reverse chain (x: [B, A], noise:
    [T, B, A]) and through the picked head to its action input; the caller turns the critics' requires_grad off, as
    the official code discards their weight gradients anyway."""
    behaviour_loss = bc_loss(nets["actor"], schedule, batch["obs"], batch["actions"], t, eps)
    new_actions = reverse_chain(nets["actor"], schedule, batch["obs"], x, noise, backend).clamp(-1.0, 1.0)  # [B, A]
    q_used, q_other = (nets["qf1"], nets["qf2"]) if use_qf1 else (nets["qf2"], nets["qf1"])
    with torch.no_grad():  # the other head only gives the detached normaliser: no graph needed for it
        q_norm = q_other(batch["obs"], new_actions)
    return behaviour_loss, q_term(q_used(batch["obs"], new_actions), q_norm, use_q1=True)  # arguments: (used, other)


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
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], step: int, start: int, every: int,
               decay: float) -> bool:
    """Official EMA actor update: ema <- decay * ema + (1 - decay) * actor when step % every == 0 and step >= start.
    Before `start` the EMA actor stays the initial actor it was copied from. Returns whether it moved."""
    if step % every != 0 or step < start:
        return False
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    return True


def build_agent(args: Args, obs_dim: int, act_dim: int,
                device: torch.device) -> tuple[dict[str, nn.Module], torch.optim.Adam, torch.optim.Adam, DDPMSchedule]:
    """The networks (actor, ema_actor, qf1, qf2, qf1_target, qf2_target), the critic and actor Adams, the schedule."""
    actor = Denoiser(obs_dim, act_dim, args.hidden_dim, args.time_dim, args.diffusion_steps).to(device)
    ema_actor = Denoiser(obs_dim, act_dim, args.hidden_dim, args.time_dim, args.diffusion_steps).to(device)
    qf1, qf2 = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device), QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    qf1_target = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    qf2_target = QNetwork(obs_dim, act_dim, args.hidden_dim).to(device)
    ema_actor.load_state_dict(actor.state_dict())  # a copy of the initial actor, frozen until step `ema_start`
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    for net in (ema_actor, qf1_target, qf2_target):
        net.requires_grad_(False)
    # fused=True: one multi-tensor Adam kernel per optimizer instead of per-parameter ops (same update up to rounding)
    q_optimizer = torch.optim.Adam([*qf1.parameters(), *qf2.parameters()], lr=args.critic_lr, fused=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.lr, fused=True)
    schedule = DDPMSchedule(vp_beta_schedule(args.diffusion_steps), device)
    nets = {"actor": actor, "ema_actor": ema_actor, "qf1": qf1, "qf2": qf2, "qf1_target": qf1_target,
            "qf2_target": qf2_target}
    return nets, q_optimizer, actor_optimizer, schedule


def lr_factor(step: int, lr_decay: bool, eval_frequency: int, total_timesteps: int) -> float:
    """Official --lr_decay: CosineAnnealingLR(T_max = epochs = total_timesteps / 1000) stepped once per `agent.train`
    call, i.e. once per evaluation (every `eval_frequency` steps); 1.0 without --lr-decay."""
    if not lr_decay:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step // eval_frequency) / (total_timesteps / 1000)))


def train_step(args: Args, nets: dict[str, nn.Module], q_optimizer: torch.optim.Optimizer,
               actor_optimizer: torch.optim.Optimizer, schedule: DDPMSchedule, data: dict[str, torch.Tensor],
               global_step: int, backend: str, compute_critic_losses=critic_losses,
               compute_actor_losses=actor_losses) -> tuple[torch.Tensor, ...]:
    """One gradient step in the official order: critic, then actor, then EMA actor and target critic. The random draws
    are made here in a fixed order (batch indices, critic-target chain, t, eps, actor chain, head pick).

    Returns (qf1_loss, qf2_loss, mean Q1(s, a), mean Q2(s, a), actor_loss, bc_loss, ql_loss), all 0-dim tensors."""
    critic_params, actor_params = q_optimizer.param_groups[0]["params"], actor_optimizer.param_groups[0]["params"]
    factor = lr_factor(global_step, args.lr_decay, args.eval_frequency, args.total_timesteps)
    actor_optimizer.param_groups[0]["lr"], q_optimizer.param_groups[0]["lr"] = args.lr * factor, args.critic_lr * factor
    num_transitions, act_dim = data["actions"].shape
    device = data["actions"].device
    idx = torch.randint(0, num_transitions, (args.batch_size,), device=device)  # uniform, with replacement
    batch = {k: v[idx] for k, v in data.items()}  # obs, next_obs [B, S], actions [B, A], rewards, not_dones [B]

    backup_samples = args.max_q_backup_samples if args.max_q_backup else 1
    x, noise = draw_noise(schedule, args.batch_size * backup_samples, act_dim, device)
    qf1_loss, qf2_loss, qf1_values, qf2_values = compute_critic_losses(nets, schedule, batch, x, noise, args.gamma,
                                                                       backup_samples, backend)
    q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()
    if args.grad_norm > 0:
        nn.utils.clip_grad_norm_(critic_params, args.grad_norm)
    q_optimizer.step()

    # actor: diffusion BC + eta * normalised Q of a full reverse chain, backpropagated through every step
    t = torch.randint(0, schedule.T, (args.batch_size,), device=device)
    eps = torch.randn(args.batch_size, act_dim, device=device)
    x, noise = draw_noise(schedule, args.batch_size, act_dim, device)
    use_qf1 = bool(np.random.uniform() > 0.5)  # official random head pick
    for p in critic_params:  # dL/d(critic weights) is discarded by the official code: skip computing it
        p.requires_grad_(False)
    behaviour_loss, ql_loss = compute_actor_losses(nets, schedule, batch, t, eps, x, noise, use_qf1, backend)
    for p in critic_params:
        p.requires_grad_(True)
    actor_loss = behaviour_loss + args.eta * ql_loss
    actor_optimizer.zero_grad()
    actor_loss.backward()
    if args.grad_norm > 0:
        nn.utils.clip_grad_norm_(actor_params, args.grad_norm)
    actor_optimizer.step()

    update_ema(list(nets["ema_actor"].parameters()), actor_params, global_step, args.ema_start, args.ema_frequency,
               args.ema_decay)
    with torch.no_grad():
        torch._foreach_lerp_([*nets["qf1_target"].parameters(), *nets["qf2_target"].parameters()], critic_params,
                             args.tau)
    return qf1_loss, qf2_loss, qf1_values, qf2_values, actor_loss, behaviour_loss, ql_loss


@torch.no_grad()
def select_actions(nets: dict[str, nn.Module], schedule: DDPMSchedule, obs: torch.Tensor, num_candidates: int,
                   backend: str = "torch") -> torch.Tensor:
    """Evaluation action: `num_candidates` samples per state [B, S] from the online (not the EMA) actor, one drawn per
    state with probability softmax(min(Q1', Q2')) of the target critics over its candidates (temperature 1, as the
    official `sample_action`). Returns [B, A]."""
    batch = obs.shape[0]
    obs_rep = obs.repeat_interleave(num_candidates, 0)  # [B*K, S], the candidates of a state are contiguous
    actions = sample_actions(nets["actor"], schedule, obs_rep, backend)  # [B*K, A]
    q = torch.min(nets["qf1_target"](obs_rep, actions), nets["qf2_target"](obs_rep, actions))
    q = q.view(batch, num_candidates)
    idx = torch.multinomial(torch.softmax(q, dim=1), 1).squeeze(1)  # [B]
    return actions.view(batch, num_candidates, -1)[torch.arange(batch, device=obs.device), idx]


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
    if args.resume:  # the saved (resolved) flags become the defaults; flags given now override them
        checkpoint = load_checkpoint(args.resume)
        args = tyro.cli(Args, default=Args(**{**checkpoint["args"], "resume": args.resume}))
        check_args(args)
        check_resume_args(args, checkpoint["args"])
    args, task = resolve_preset(args)
    dataset = load_dataset(args.dataset_id)
    check_spaces(dataset, args.dataset_id)
    if args.capture_video:
        check_video(dataset)
    run_name = (checkpoint["run_name"] if checkpoint
                else f"{args.dataset_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}")
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
    compile_step = args.compile and backend == "torch"

    # data setup: the whole dataset on the device; eval envs recovered from the dataset (fixed seeds seed+100+i)
    data = dataset_tensors(dataset, args.reward_tune, device, args.goal_terminals)
    num_transitions = data["obs"].shape[0]
    eval_envs = [make_env(dataset, args.seed + 100 + i, os.path.join(run_dir, "videos") if args.capture_video and i == 0
                          else None)() for i in range(args.eval_episodes)]
    metadata = dataset.storage.metadata
    ref_scores = (metadata["ref_min_score"], metadata["ref_max_score"]) if "ref_max_score" in metadata else None
    if ref_scores and not (np.all(np.isfinite(ref_scores)) and ref_scores[1] != ref_scores[0]):
        ref_scores = None  # equal or non-finite reference scores: no normalised score (it would be inf or NaN)
    obs_dim, act_dim = data["obs"].shape[1], data["actions"].shape[1]
    print(f"{args.dataset_id}: {num_transitions:,} transitions, obs {obs_dim}, act {act_dim}; preset {task} "
          f"(lr {args.lr}, eta {args.eta}, max_q_backup {args.max_q_backup}, reward {args.reward_tune}, "
          f"grad_norm {args.grad_norm}, {args.total_timesteps:,} steps); kernels {backend}, compile {compile_step}"
          + (" (the first steps compile: ~1 min on a CPU the first time, seconds once cached)" if compile_step else ""),
          flush=True)

    # ALGO LOGIC: initialize agent here
    nets, q_optimizer, actor_optimizer, schedule = build_agent(args, obs_dim, act_dim, device)
    stateful = {**nets, "q_optimizer": q_optimizer, "actor_optimizer": actor_optimizer}
    compute_critic_losses, compute_actor_losses = critic_losses, actor_losses
    if compile_step:  # one fused forward+backward per loss (Triton kernels have their own fused chain instead)
        compute_critic_losses, compute_actor_losses = compile_or_eager(critic_losses), compile_or_eager(actor_losses)
    global_step, eval_history = 0, []
    if checkpoint:
        for name, module in stateful.items():
            module.load_state_dict(checkpoint[name])
        global_step, eval_history = checkpoint["global_step"], checkpoint["eval"]
        set_rng_states(checkpoint["rng"])
        print(f"resumed {run_name} at step {global_step:,}")

    def write_summary(wall_seconds: float, sps: float | None) -> None:
        returns = [e["mean_return"] for e in eval_history]
        scores = [e["normalized_score"] for e in eval_history if e.get("normalized_score") is not None]
        summary = {"args": asdict(args), "eval": eval_history, "final_eval_return": returns[-1] if returns else None,
                   "best_eval_return": max(returns) if returns else None, "sps": sps, "wall_seconds": wall_seconds,
                   "global_step": global_step, "kernels": backend, "precision": precision, "compile": compile_step,
                   "device": str(device), "preset": task,
                   "best_normalized_score": max(scores) if scores else None,
                   "last_normalized_score": scores[-1] if scores else None,
                   "train_ms_per_step": 1000 * (time.time() - start_time - eval_seconds) / (global_step - start_step)
                   if global_step > start_step else None}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)

    def run_evaluation() -> None:
        global eval_seconds
        eval_start = time.time()
        policy = lambda obs: select_actions(nets, schedule, obs, args.eval_candidates, backend)  # noqa: E731
        returns = evaluate(eval_envs, policy, args.seed + 100, device)
        entry = {"step": global_step, "mean_return": float(returns.mean()), "std_return": float(returns.std())}
        writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
        writer.add_scalar("eval/episodic_return_std", returns.std(), global_step)
        text = f"eval  step {global_step:>10,} | return {returns.mean():10.2f} +- {returns.std():.2f}"
        if ref_scores:  # x100 of the official get_normalized_score(mean return); std over episodes
            scores = 100 * (returns - ref_scores[0]) / (ref_scores[1] - ref_scores[0])
            entry.update(normalized_score=float(scores.mean()), normalized_score_std=float(scores.std()))
            writer.add_scalar("eval/normalized_score", scores.mean(), global_step)
            text += f" | normalized {scores.mean():6.1f} +- {scores.std():.1f}"
        eval_history.append(entry)
        eval_seconds += time.time() - eval_start
        print(f"{text} ({len(returns)} episodes)", flush=True)

    def checkpoint_state() -> dict:
        return {**{k: m.state_dict() for k, m in stateful.items()}, "args": {**asdict(args), "resume": None},
                "run_name": run_name, "global_step": global_step, "eval": eval_history, "rng": rng_states(),
                "wall_seconds": prior_wall + time.time() - start_time}

    start_time, start_step = time.time(), global_step
    last_log = (global_step, start_time)  # (step, time) of the last status line
    prior_wall = checkpoint["wall_seconds"] if checkpoint else 0.0
    losses, eval_seconds = {}, 0.0  # time spent in evaluation, left out of train_ms_per_step

    while global_step < args.total_timesteps:
        # ALGO LOGIC: training (one update: critic, then actor, then EMA actor and target critic; official order)
        qf1_loss, qf2_loss, qf1_values, qf2_values, actor_loss, behaviour_loss, ql_loss = train_step(
            args, nets, q_optimizer, actor_optimizer, schedule, data, global_step, backend, compute_critic_losses,
            compute_actor_losses)
        global_step += 1

        # TRY NOT TO MODIFY: logging, evaluation and checkpoints at fixed gradient-step intervals; a status line also
        # every `status_interval` seconds, so that a slow run shows it is alive
        log_now, now = global_step % args.log_frequency == 0, time.time()
        if log_now or now - last_log[1] >= args.status_interval:
            losses.update(qf1_loss=qf1_loss, qf2_loss=qf2_loss, qf1_values=qf1_values, qf2_values=qf2_values,
                          actor_loss=actor_loss, bc_loss=behaviour_loss, ql_loss=ql_loss)
            values = {k: v.item() for k, v in losses.items()}
            if log_now:  # TensorBoard scalars stay step-based
                writer.add_scalar("charts/SPS", int((global_step - start_step) / (now - start_time)), global_step)
                for k, v in values.items():
                    writer.add_scalar(f"losses/{k}", v, global_step)
                writer.add_scalar("losses/qf_loss", (values["qf1_loss"] + values["qf2_loss"]) / 2, global_step)
            sps, last_log = (global_step - last_log[0]) / max(now - last_log[1], 1e-9), (global_step, now)  # recent
            eta = format_duration((args.total_timesteps - global_step) / sps) if sps > 0 else "?"
            last = eval_history[-1]["mean_return"] if eval_history else float("nan")
            print(f"step {global_step:>10,} | SPS {sps:>7.1f} | ETA {eta} | eval {last:10.2f} | "
                  f"qf1_loss {values['qf1_loss']:.4g} | bc_loss {values['bc_loss']:.4g} | ql_loss {values['ql_loss']:.4g}",
                  flush=True)
        if global_step % args.eval_frequency == 0 or global_step >= args.total_timesteps:
            run_evaluation()
            write_summary(prior_wall + time.time() - start_time, (global_step - start_step) / (time.time() - start_time))
            last_log = (global_step, time.time())  # the status line's SPS and ETA leave the evaluation out
        if args.save_model and (global_step % args.checkpoint_frequency == 0 or global_step >= args.total_timesteps):
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), checkpoint_state())

    if global_step == start_step and not eval_history:  # resumed at or past --total-timesteps before any evaluation
        run_evaluation()
        write_summary(prior_wall + time.time() - start_time, None)  # no summary before this evaluation; no SPS
    wall = time.time() - start_time
    if global_step > start_step:  # a resume with nothing left to do keeps the summary's SPS
        write_summary(prior_wall + wall, (global_step - start_step) / wall)
    final = eval_history[-1] if eval_history else {}
    print(f"done: {global_step:,} gradient steps in {wall:.0f} s; final eval return {final.get('mean_return', float('nan')):.2f}"
          + (f", normalized {final['normalized_score']:.1f}" if "normalized_score" in final else "")
          + f"; summary in {os.path.join(run_dir, 'summary.json')}")
    for env in eval_envs:
        env.close()
    writer.close()
