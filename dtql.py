# Docs: docs/dtql.md
"""Diffusion Trusted Q-Learning (DTQL): a one-step policy in a diffusion trust region, offline, in one file.

Paper: Chen, Wang, Zhou, "Diffusion Policies creating a Trust Region for Offline Reinforcement Learning" (NeurIPS
2024; arXiv 2405.19690). Official PyTorch code: TianyuCodings/Diffusion_Trusted_Q_Learning @ 9a29cea; its per-task
table is `OFFICIAL_TASKS` below. DTQL never samples its diffusion model: `--kernels` and `--diffusion-steps` are
accepted for the common command line and have no effect.

Deviations from the official code (docs/dtql.md gives the reasons):
1. Data come from Minari, not `d4rl.qlearning_dataset`; actions are rescaled from the dataset's Box to [-1, 1].
2. Evaluation episodes run in lock-step, one env each, seeded seed+100+i (official: one env, in sequence).
3. Pretraining is part of the run and its checkpoint (official: cached files silently reloaded by later runs).
4. The main loop runs exactly `total_timesteps` steps (official: one extra).
5. Objects the official code builds but never reads (EMA copies, per-iteration env.reset) are not built.
6. Speed with the same math: one critic forward for the value target, policy-only gradients, torch.compile.
7. Dict observations (antmaze, kitchen) are flattened in sorted key order at every level.
8. Datasets with no official twin get the preset of their family (locomotion, antmaze, Adroit, kitchen).
9. Dataset actions are clipped to [-1, 1] after rescaling (official: no clip), so the NLL's atanh stays finite.
10. AntMaze: a reward-1 step ends the bootstrap, as D4RL's terminals (Minari's antmaze never terminates; `--goal-terminals`).
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

# The official per-task table (DTQL main.py `offline_hyperparameters`): lr of the BC model and of the policy, alpha
# (trust-region weight), gamma (NLL weight, not the discount), lr_decay, epochs of 1000 main-loop steps, batch size,
# IQL expectile. The official antmaze -v2 rows equal the -v0 rows. Eval episodes: 10 for the gym (-v2) tasks, else 100.
OFFICIAL_TASKS = {
    "halfcheetah-medium-v2": (3e-4, 1.0, 0.0, False, 1000, 256, 0.7),
    "halfcheetah-medium-replay-v2": (3e-4, 5.0, 0.0, False, 1000, 256, 0.7),
    "halfcheetah-medium-expert-v2": (3e-4, 50.0, 0.0, False, 1000, 256, 0.7),
    "hopper-medium-v2": (1e-4, 5.0, 0.0, True, 1000, 256, 0.7),
    "hopper-medium-replay-v2": (3e-4, 5.0, 0.0, False, 1000, 256, 0.7),
    "hopper-medium-expert-v2": (3e-4, 20.0, 0.0, False, 1000, 256, 0.7),
    "walker2d-medium-v2": (3e-4, 5.0, 0.0, True, 1000, 256, 0.7),
    "walker2d-medium-replay-v2": (3e-4, 5.0, 0.0, True, 1000, 256, 0.7),
    "walker2d-medium-expert-v2": (3e-4, 5.0, 0.0, True, 1000, 256, 0.7),
    "antmaze-umaze-v0": (3e-4, 1.0, 1.0, False, 500, 2048, 0.9),
    "antmaze-umaze-diverse-v0": (3e-5, 1.0, 1.0, True, 500, 2048, 0.9),
    "antmaze-medium-play-v0": (3e-4, 1.0, 1.0, False, 400, 2048, 0.9),
    "antmaze-medium-diverse-v0": (3e-4, 1.0, 1.0, False, 400, 2048, 0.9),
    "antmaze-large-play-v0": (3e-4, 1.0, 1.0, False, 350, 2048, 0.9),
    "antmaze-large-diverse-v0": (3e-4, 0.5, 1.0, False, 300, 2048, 0.9),
    "pen-human-v1": (3e-5, 1500.0, 0.0, True, 300, 256, 0.9),
    "pen-cloned-v1": (1e-5, 1500.0, 0.0, False, 200, 256, 0.7),
    "kitchen-complete-v0": (1e-4, 200.0, 0.0, True, 500, 256, 0.7),
    "kitchen-partial-v0": (1e-4, 100.0, 0.0, True, 1000, 256, 0.7),
    "kitchen-mixed-v0": (3e-4, 200.0, 0.0, True, 500, 256, 0.7),
}
# Named presets: the official row of one representative task per family (the same tasks as diffusion_ql.py), used
# for datasets with no official twin.
PRESETS = {"locomotion": "hopper-medium-v2", "antmaze": "antmaze-medium-diverse-v0", "pen": "pen-human-v1",
           "kitchen": "kitchen-partial-v0"}


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
    """gradient steps (pretraining included) between checkpoints (with --save-model)"""
    dataset_id: str = "mujoco/hopper/medium-v0"
    """Minari dataset id (Box observations and actions); looked up under MINARI_DATASETS_PATH first"""
    goal_terminals: bool | None = None
    """steps with reward 1 end the bootstrap (not_done = 0), as the `terminals` of D4RL's antmaze data that the official
    code trained on (Minari's antmaze episodes never terminate, so the goal would be worth a discounted sum of goal
    rewards instead of one); None: on for antmaze datasets, off otherwise"""
    total_timesteps: int | None = None
    """main-loop gradient steps, after the `pretrain_steps` (None: the preset's epochs x 1000, e.g. 1M for locomotion)"""
    learning_starts: int = 0
    """unused offline (the whole dataset is there from step 0); kept for the common flag set, must be 0"""
    num_envs: int = 1
    """unused offline (evaluation runs its `eval_episodes` envs in lock-step); kept for the common flag set, must be 1"""
    batch_size: int | None = None
    """the batch size of transitions sampled uniformly (with replacement) from the dataset (None: preset, 256 or 2048)"""
    eval_frequency: int = 50_000
    """main-loop gradient steps between evaluations (official: every 50 epochs of 1000 steps)"""
    eval_episodes: int | None = None
    """episodes per evaluation (None: 10 for locomotion, 100 for antmaze, pen and kitchen, as the official code)"""
    diffusion_steps: int = 0
    """unused: DTQL's diffusion model has a continuous noise level and is never sampled (kept for the common flag set)"""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """unused: DTQL never runs a reverse chain, so any value has no effect (kept for the common flag set)"""
    precision: Literal["ieee", "tf32"] = "ieee"
    """float32 matmuls on a GPU (no effect on a CPU): ieee, as PyTorch computes them (the official runs), or tf32"""
    log_frequency: int = 1_000
    """gradient steps between status lines and TensorBoard loss scalars"""
    status_interval: float = 30.0
    """seconds of wall time between status lines (besides the one every `log_frequency` steps)"""

    # Algorithm specific arguments
    preset: str = "auto"
    """official hyper-parameters: auto (from the dataset id), locomotion, antmaze, pen, kitchen, or an official task
    name such as hopper-medium-v2; the flags below that default to None override it one by one"""
    lr: float | None = None
    """learning rate of the BC diffusion model and of the one-step policy (None: preset)"""
    alpha: float | None = None
    """weight of the diffusion trust-region loss in the policy loss (None: preset)"""
    nll_weight: float | None = None
    """weight of the NLL of dataset actions in the policy loss, `gamma` in the official code (None: preset)"""
    lr_decay: bool | None = None
    """cosine lr decay to 0 over the main loop, stepped every gradient step, on all three optimizers (None: preset)"""
    expectile: float | None = None
    """IQL expectile of the value loss (None: preset)"""
    reward_tune: Literal["no", "iql_antmaze"] | None = None
    """reward transform: none, or r - 1 (None: iql_antmaze for antmaze, else no; as the official code)"""
    pretrain_steps: int = 50_000
    """gradient steps of BC diffusion + critic pretraining before the main loop (official: 50 epochs)"""
    critic_lr: float = 3e-4
    """learning rate of the IQL critic (hard-coded 3e-4 in the official code for every task)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """Polyak coefficient of the target critic, every main-loop step (the target ranks evaluation candidates only)"""
    sigma_data: float = 0.5
    """EDM sigma_data"""
    sigma_min: float = 0.002
    """lower truncation of the log-logistic noise-level density"""
    sigma_max: float = 80.0
    """upper truncation of the log-logistic noise-level density"""
    eval_candidates: int = 1024
    """policy samples per state at evaluation, one drawn by softmax of the target min-Q (official `--repeats`)"""
    eval_deterministic: bool = False
    """evaluate the deterministic one-step action tanh(mu) instead of the candidate resampling"""
    hidden_dim: int = 256
    """width of the hidden layers of the BC model, the policy and the critic"""
    time_dim: int = 16
    """size of the sinusoidal embedding of ln(sigma) / 4"""
    compile: bool = True
    """torch.compile the critic, BC and policy losses, forward and backward (~1.2x faster steps on CPU; the first run
    compiles for ~1 min, later runs load inductor's cache); eager with a warning if it fails"""


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
    for name, value in vars(args).items():  # nan/inf pass `<`-checks (lr, alpha, expectile, sigmas, ...)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    positive = ["eval_frequency", "log_frequency", "status_interval", "checkpoint_frequency", "eval_candidates",
                "hidden_dim", "critic_lr"]
    optional = ("total_timesteps", "batch_size", "eval_episodes", "lr")  # None: the preset's value
    for name in positive + [n for n in optional if getattr(args, n) is not None]:
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.learning_starts != 0 or args.num_envs != 1:
        fail("--learning-starts and --num-envs are unused offline; leave them at 0 and 1")
    if args.pretrain_steps < 0 or args.diffusion_steps < 0:
        fail(f"--pretrain-steps and --diffusion-steps must be >= 0, got {args.pretrain_steps} and {args.diffusion_steps}")
    if not 0 <= args.seed < 2**32:  # np.random.seed's range
        fail(f"--seed must be in [0, 2**32) (numpy's seed range), got {args.seed}")
    if args.preset != "auto" and args.preset not in PRESETS and args.preset not in OFFICIAL_TASKS:
        fail(f"unknown --preset {args.preset!r}; choose auto, {', '.join(PRESETS)} or an official task name "
             f"such as hopper-medium-v2")
    if not 0 < args.gamma <= 1 or not 0 < args.tau <= 1:
        fail(f"--gamma and --tau must be in (0, 1], got {args.gamma} and {args.tau}")
    if (args.alpha is not None and args.alpha < 0) or (args.nll_weight is not None and args.nll_weight < 0):
        fail(f"--alpha and --nll-weight must be >= 0, got {args.alpha} and {args.nll_weight}")
    if args.expectile is not None and not 0 < args.expectile < 1:
        fail(f"--expectile must be in (0, 1), got {args.expectile}")
    if not 1e-6 <= args.sigma_min < args.sigma_data < args.sigma_max <= 1e6:  # float32 EDM scalings stay finite
        fail(f"need 1e-6 <= --sigma-min < --sigma-data < --sigma-max <= 1e6, got {args.sigma_min}, {args.sigma_data}, "
             f"{args.sigma_max}")
    if args.time_dim < 4 or args.time_dim % 2:
        fail(f"--time-dim must be an even number >= 4, got {args.time_dim}")
    if args.resume and not os.path.isfile(args.resume):
        fail(f"--resume: no checkpoint at {args.resume!r} (runs/<run_name>/checkpoint.pt is written by --save-model)")


# Flags that fix the shapes of the saved networks (the dataset fixes the observation and action sizes): a resumed run
# must keep them. --diffusion-steps is not one: DTQL's noise level is continuous.
SHAPE_ARGS = ("dataset_id", "hidden_dim", "time_dim")


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


# --preset auto: the family of a Minari env name (the id's part before the last "/"); any other env is locomotion.
# The official code's only Adroit task (pen) stands for the whole Adroit suite: door, hammer and relocate get its row.
FAMILIES = {"antmaze": "antmaze", "pen": "pen", "door": "pen", "hammer": "pen", "relocate": "pen",
            "kitchen": "kitchen"}


def resolve_preset(args: Args) -> tuple[Args, str]:
    """Fills every None hyper-parameter from the preset; returns the resolved args and the official row used."""
    if args.preset in OFFICIAL_TASKS:
        task = args.preset
    elif args.preset in PRESETS:
        task = PRESETS[args.preset]
    else:  # auto: the dataset's official twin, else the family preset of its env name, else locomotion
        task = official_task(args.dataset_id) or PRESETS[FAMILIES.get(env_name(args.dataset_id), "locomotion")]
    lr, alpha, nll_weight, lr_decay, epochs, batch_size, expectile = OFFICIAL_TASKS[task]
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return replace(args, lr=pick(args.lr, lr), alpha=pick(args.alpha, alpha), nll_weight=pick(args.nll_weight, nll_weight),
                   lr_decay=pick(args.lr_decay, lr_decay), expectile=pick(args.expectile, expectile),
                   batch_size=pick(args.batch_size, batch_size), total_timesteps=pick(args.total_timesteps, epochs * 1000),
                   reward_tune=pick(args.reward_tune, "iql_antmaze" if task.startswith("antmaze") else "no"),
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


def dataset_tensors(dataset, reward_tune: str, device: torch.device,
                    goal_terminals: bool = False) -> dict[str, torch.Tensor]:
    """All transitions of the dataset as device tensors: obs/next_obs [N, S], actions [N, A] rescaled to [-1, 1] and
    clipped there (the NLL term takes atanh(a / (1 + 1e-3)), NaN beyond |a| = 1.001), rewards [N, 1] (after the
    reward transform) and not_dones [N, 1] (0 where the episode terminated and, with `goal_terminals`, where the raw
    reward is 1: D4RL's antmaze `terminals`)."""
    obs, next_obs, actions, rewards, terminals = [], [], [], [], []
    for ep in dataset.iterate_episodes():
        ep_obs = flatten_obs(ep.observations, dataset.observation_space)  # [T+1, S]
        obs.append(ep_obs[:-1]), next_obs.append(ep_obs[1:]), actions.append(ep.actions)
        rewards.append(ep.rewards), terminals.append(ep.terminations)
    low, high = dataset.action_space.low, dataset.action_space.high
    actions = 2.0 * (np.concatenate(actions) - low) / (high - low) - 1.0
    raw_rewards = np.concatenate(rewards)
    terminals = np.concatenate(terminals) | (goal_terminals & (raw_rewards == 1.0))  # [N] bool
    rewards = raw_rewards.astype(np.float32)
    if reward_tune == "iql_antmaze":
        rewards = rewards - 1.0
    data = {"obs": np.concatenate(obs), "next_obs": np.concatenate(next_obs), "actions": np.clip(actions, -1.0, 1.0),
            "rewards": rewards[:, None], "not_dones": 1.0 - terminals.astype(np.float32)[:, None]}
    return {k: torch.as_tensor(v, dtype=torch.float32).to(device) for k, v in data.items()}


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
        fail(f"{dataset_id} has unbounded actions; the tanh policy needs finite Box bounds")
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
        # render_mode only when recording: envs without a render_mode argument (the test bandit) must work
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


# ---------------------------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022) pieces, as in the official diffusion/karras.py and diffusion/utils.py
def edm_scalings(sigma: torch.Tensor, sigma_data: float):
    """sigma [B] -> c_skip, c_out, c_in, each [B, 1]."""
    sigma = sigma[:, None]
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def sample_sigma(n: int, sigma_data: float, sigma_min: float, sigma_max: float, device) -> torch.Tensor:
    """Truncated log-logistic noise levels: log(sigma) ~ Logistic(loc=ln sigma_data, scale=0.5) restricted to
    [sigma_min, sigma_max] by inverse-CDF sampling in float64 (official `rand_log_logistic`). -> [n] float32."""
    loc, scale = math.log(sigma_data), 0.5
    # CDF bounds of the truncation, in Python float64 (no device tensors built per call)
    lo = 1 / (1 + math.exp(-(math.log(sigma_min) - loc) / scale))
    hi = 1 / (1 + math.exp(-(math.log(sigma_max) - loc) / scale))
    u = torch.rand(n, dtype=torch.float64, device=device) * (hi - lo) + lo
    return (torch.logit(u) * scale + loc).exp().float()


def edm_loss(model: nn.Module, x: torch.Tensor, state: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
             sigma_data: float, max_action: float) -> torch.Tensor:
    """EDM loss with the denoiser output clamped to +-max_action and weight 1/c_out^2 (official `clip_denoised`).
    x [B, A] clean actions (dataset actions for BC; the policy's actions for the trust-region loss, where gradients
    flow into x through both the noisy input x + sigma * noise and the regression target), state [B, S],
    sigma [B], noise [B, A] -> scalar mean over batch and action dims."""
    c_skip, c_out, c_in = edm_scalings(sigma, sigma_data)
    x_noisy = x + noise * sigma[:, None]
    denoised = c_skip * x_noisy + c_out * model(c_in * x_noisy, state, torch.log(sigma) / 4)
    denoised = denoised.clamp(-max_action, max_action)
    return (((denoised - x) / c_out) ** 2).mean()


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL asymmetric L2 (elementwise): weight expectile where diff > 0, 1 - expectile elsewhere; diff = q - v."""
    weight = torch.where(diff > 0, expectile, 1 - expectile)
    return weight * diff**2


# ---------------------------------------------------------------------------------------------------------------
# Networks
def mish_one_exp(z: torch.Tensor) -> torch.Tensor:
    """mish(z) = z tanh(softplus(z)) with one exp: n = e^z (e^z + 2) gives tanh(log(1 + e^z)) = n / (n + 2). z is
    clamped at 20 so n stays finite in fp32 (mish(z) = z there to fp32 precision)."""
    e = torch.exp(z.clamp(max=20.0))
    n = e * (e + 2.0)
    return torch.where(z > 20.0, z, z * n / (n + 2.0))


class Mish(nn.Module):
    """F.mish in eager mode; the one-exp formula inside torch.compile (--compile), where inductor fuses it, and its
    derivative, with the neighbouring ops (F.mish would decompose into exp + log1p + tanh, ~3x slower on CPU)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return mish_one_exp(z) if torch.compiler.is_compiling() else F.mish(z)


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1))), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t [B] (continuous) -> [B, dim]
        emb = t[:, None] * self.freqs[None, :]
        return torch.cat([emb.sin(), emb.cos()], dim=-1)


class ScoreNetwork(nn.Module):
    """The official BC denoiser F(c_in x, s, ln(sigma)/4): input cat[x, s, temb] -> Linear(in,256) -> Linear(256,256)
    -> Mish -> Linear(256,256) -> Mish -> Linear(256,256) -> Mish -> Linear(256,A). The official MLPNetwork puts no
    activation after its first Linear, so the first two Linear layers compose to one linear map; kept for parity."""

    def __init__(self, state_dim: int, action_dim: int, hidden_dim: int, time_dim: int):
        super().__init__()
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(time_dim), nn.Linear(time_dim, time_dim * 2), Mish(), nn.Linear(time_dim * 2, time_dim)
        )
        self.net = nn.Sequential(
            nn.Linear(action_dim + state_dim + time_dim, hidden_dim),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, action_dim),
        )

    def forward(self, x: torch.Tensor, state: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x [B, A], state [B, S], t [B] -> [B, A]
        return self.net(torch.cat([x, state, self.time_mlp(t)], dim=-1))


class Actor(nn.Module):
    """One-step tanh-Gaussian policy (official DiagGaussianActorTanhAction): 3 x 256 ReLU MLP -> (mu, log_std),
    log_std clamped to [-5, 2], orthogonal weights and zero biases."""

    def __init__(self, state_dim: int, action_dim: int, max_action: float, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(state_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, 2 * action_dim),
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight)
                nn.init.zeros_(m.bias)
        self.max_action = max_action

    def forward(self, state: torch.Tensor):  # state [B, S] -> mu [B, A], log_std [B, A]
        mu, log_std = self.net(state).chunk(2, dim=-1)
        return mu, log_std.clamp(-5.0, 2.0)

    def sample(self, state: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised a = clamp(max_action * tanh(mu + std * eps)) [B, A], eps ~ N(0, I) unless given."""
        mu, log_std = self(state)
        eps = torch.randn_like(mu) if eps is None else eps
        a = torch.tanh(mu + log_std.exp() * eps) * self.max_action
        return a.clamp(-self.max_action, self.max_action)

    def deterministic(self, state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(state)[0]) * self.max_action

    def log_prob(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Gaussian log-density of atanh(a / (max_action + 1e-3)) summed over action dims, no tanh Jacobian (official)
        -> [B, 1]."""
        mu, log_std = self(state)
        std = log_std.exp()
        z = torch.atanh(action / (self.max_action + 1e-3))
        # torch's Normal(mu, std).log_prob op for op (var = std^2, log(std) of the exp'd std), as the official code:
        # exp(2 log_std) and log_std itself differ from those in the last float bit, which Adam's normalised step
        # turns into ~1e-5 relative parameter differences within a few updates (benchmarks/parity/dtql.py)
        logp = -((z - mu) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
        return logp.sum(-1, keepdim=True)


class Critic(nn.Module):
    """IQL critic (official agents/model.py): Q1, Q2 = [Linear-LayerNorm-Mish] x 3 -> Linear(256, 1) on cat[s, a];
    V = [Linear-Mish] x 3 -> Linear(256, 1) on s, without LayerNorm. One module, one optimizer."""

    def __init__(self, state_dim: int, action_dim: int, hidden_dim: int):
        super().__init__()

        def q_net():
            return nn.Sequential(
                nn.Linear(state_dim + action_dim, hidden_dim), nn.LayerNorm(hidden_dim), Mish(),
                nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), Mish(),
                nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), Mish(),
                nn.Linear(hidden_dim, 1),
            )

        self.q1, self.q2 = q_net(), q_net()
        self.v = nn.Sequential(
            nn.Linear(state_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, state: torch.Tensor, action: torch.Tensor):  # -> q1 [B, 1], q2 [B, 1]
        sa = torch.cat([state, action], dim=-1)
        return self.q1(sa), self.q2(sa)

    def q_min(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.min(*self(state, action))


def critic_loss(critic: Critic, s, a, r, s_next, not_done, discount: float, expectile: float):
    """IQL as the official code: L_V = expectile(min(Q1,Q2)(s,a) - V(s)) with the ONLINE Q detached, and
    L_Q = MSE(Q1, y) + MSE(Q2, y), y = r + discount * not_done * V(s') with the ONLINE V detached.
    -> (total, v_loss, q1_loss, q2_loss, q1, q2)."""
    q1, q2 = critic(s, a)
    v_loss = expectile_loss(torch.min(q1, q2).detach() - critic.v(s), expectile).mean()
    with torch.no_grad():
        y = r + not_done * discount * critic.v(s_next)
    q1_loss, q2_loss = F.mse_loss(q1, y), F.mse_loss(q2, y)
    return v_loss + q1_loss + q2_loss, v_loss, q1_loss, q2_loss, q1, q2


def policy_loss(actor: Actor, bc_model: ScoreNetwork, critic: Critic, s: torch.Tensor, a_data: torch.Tensor,
                eps: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, alpha: float, nll_weight: float,
                sigma_data: float):
    """Official distill-actor loss: alpha * L_TR + L_Q + nll_weight * L_NLL, with L_TR the EDM loss at the policy's
    own reparameterised actions (policy noise eps [B, A]; fresh noise level sigma [B] and EDM noise [B, A]), L_Q =
    -mean(min(Q1, Q2)(s, a_pi)) with no normalisation, and L_NLL the NLL of the dataset actions a_data (skipped when
    nll_weight = 0). -> (total, tr, q, nll)."""
    a_pi = actor.sample(s, eps)  # [B, A]
    tr_loss = edm_loss(bc_model, a_pi, s, sigma, noise, sigma_data, actor.max_action)
    ql_loss = -critic.q_min(s, a_pi).mean()
    nll_loss = -actor.log_prob(s, a_data).mean() if nll_weight != 0.0 else torch.zeros((), device=s.device)
    return alpha * tr_loss + ql_loss + nll_weight * nll_loss, tr_loss, ql_loss, nll_loss


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
def select_actions(actor: Actor, critic_target: Critic, obs: torch.Tensor, num_candidates: int,
                   deterministic: bool = False) -> torch.Tensor:
    """Evaluation action for each state of obs [B, S] -> [B, A]. Official `sample_action`: `num_candidates` samples
    of the stochastic policy per state, one drawn with probability softmax(min target Q) over them (temperature 1).
    `deterministic`: the one-step action tanh(mu) instead (no candidates, no critic)."""
    if deterministic:
        return actor.deterministic(obs)
    batch = obs.shape[0]
    obs_rep = obs.repeat_interleave(num_candidates, 0)  # [B*K, S], the candidates of a state are contiguous
    actions = actor.sample(obs_rep)  # [B*K, A]
    q = critic_target.q_min(obs_rep, actions).view(batch, num_candidates)
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


def cosine_factor(main_step: int, total: int) -> float:
    """Official lr_decay: CosineAnnealingLR(T_max=total, eta_min=0) stepped after every main-loop step, so main step
    m (0-based) runs at base_lr * 0.5 (1 + cos(pi m / total))."""
    return 0.5 * (1.0 + math.cos(math.pi * main_step / total))


def build_agent(args: Args, obs_dim: int, act_dim: int, device: torch.device) -> dict:
    """The networks and their Adam optimizers (max_action = 1: actions live in [-1, 1], see dataset_tensors /
    make_env): bc_model, actor, critic, critic_target (a frozen copy of the critic), bc_optimizer, actor_optimizer,
    critic_optimizer. Built in this order, so a seed gives the same weights as before this function existed."""
    bc_model = ScoreNetwork(obs_dim, act_dim, args.hidden_dim, args.time_dim).to(device)
    actor = Actor(obs_dim, act_dim, 1.0, args.hidden_dim).to(device)
    critic = Critic(obs_dim, act_dim, args.hidden_dim).to(device)
    critic_target = Critic(obs_dim, act_dim, args.hidden_dim).to(device)
    critic_target.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False)
    return {"bc_model": bc_model, "actor": actor, "critic": critic, "critic_target": critic_target,
            "bc_optimizer": torch.optim.Adam(bc_model.parameters(), lr=args.lr),
            "actor_optimizer": torch.optim.Adam(actor.parameters(), lr=args.lr),
            "critic_optimizer": torch.optim.Adam(critic.parameters(), lr=args.critic_lr)}


def train_step(args: Args, agent: dict, data: dict[str, torch.Tensor], global_step: int,
               loss_fns: tuple = (critic_loss, edm_loss, policy_loss)) -> dict[str, torch.Tensor]:
    """One gradient step at `global_step` (pretraining first, then the main loop); returns its detached losses.

    Pretraining (official `pretrain`): BC diffusion, then critic; no lr schedule, no target update. Main loop
    (official `train`): critic, BC diffusion, one-step policy, target critic, with the cosine lr (where on) set before
    the step. Random draws, in order: batch indices; pretraining: BC sigma and noise; main: BC sigma and noise, policy
    noise eps, trust-region sigma and noise (the official order). `loss_fns` = (critic, EDM, policy) losses, eager or
    torch.compile'd."""
    compute_critic_loss, compute_edm_loss, compute_policy_loss = loss_fns
    bc_model, actor, critic = agent["bc_model"], agent["actor"], agent["critic"]
    pretraining = global_step < args.pretrain_steps
    if not pretraining and args.lr_decay:
        factor = cosine_factor(global_step - args.pretrain_steps, args.total_timesteps)
        for name, base in (("bc_optimizer", args.lr), ("actor_optimizer", args.lr), ("critic_optimizer", args.critic_lr)):
            agent[name].param_groups[0]["lr"] = base * factor
    device = data["obs"].device
    idx = torch.randint(0, data["obs"].shape[0], (args.batch_size,), device=device)  # uniform, with replacement
    s, s_next, a = data["obs"][idx], data["next_obs"][idx], data["actions"][idx]  # [B, S], [B, S], [B, A]
    r, not_done = data["rewards"][idx], data["not_dones"][idx]  # [B, 1] each
    losses = {}

    def critic_update() -> None:
        loss, v_loss, q1_loss, q2_loss, q1, q2 = compute_critic_loss(critic, s, a, r, s_next, not_done, args.gamma,
                                                                     args.expectile)
        agent["critic_optimizer"].zero_grad()
        loss.backward()
        agent["critic_optimizer"].step()
        losses.update(value_loss=v_loss.detach(), qf1_loss=q1_loss.detach(), qf2_loss=q2_loss.detach(),
                      qf1_values=q1.detach().mean(), qf2_values=q2.detach().mean())

    def bc_update() -> None:
        sigma = sample_sigma(s.shape[0], args.sigma_data, args.sigma_min, args.sigma_max, device)
        loss = compute_edm_loss(bc_model, a, s, sigma, torch.randn_like(a), args.sigma_data, 1.0)
        agent["bc_optimizer"].zero_grad()
        loss.backward()
        agent["bc_optimizer"].step()
        losses["bc_loss"] = loss.detach()

    if pretraining:
        bc_update()
        critic_update()
        return losses
    critic_update()
    bc_update()
    eps = torch.randn(args.batch_size, a.shape[1], device=device)  # the policy's reparameterisation noise
    sigma = sample_sigma(args.batch_size, args.sigma_data, args.sigma_min, args.sigma_max, device)
    noise = torch.randn(args.batch_size, a.shape[1], device=device)
    frozen = [*bc_model.parameters(), *critic.parameters()]
    for p in frozen:  # BC model and critic weight gradients: not computed (official: computed, then discarded)
        p.requires_grad_(False)
    try:
        actor_loss, tr_loss, ql_loss, nll_loss = compute_policy_loss(actor, bc_model, critic, s, a, eps, sigma, noise,
                                                                     args.alpha, args.nll_weight, args.sigma_data)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    agent["actor_optimizer"].zero_grad()
    actor_loss.backward()
    agent["actor_optimizer"].step()
    with torch.no_grad():  # target = tau * online + (1 - tau) * target, rounded as the official code (a lerp is not)
        target_params, online = list(agent["critic_target"].parameters()), list(critic.parameters())
        torch._foreach_mul_(target_params, 1 - args.tau)
        torch._foreach_add_(target_params, torch._foreach_mul(online, args.tau))
    losses.update(actor_loss=actor_loss.detach(), trust_region_loss=tr_loss.detach(), ql_loss=ql_loss.detach(),
                  nll_loss=nll_loss.detach())
    return losses


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
    # purge what a crashed run logged after its checkpoint; the checkpoint step's own scalars were logged before saving
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
    print(f"device {device} | precision {precision} (no reverse chain)")

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
    total_steps = args.pretrain_steps + args.total_timesteps
    print(f"{args.dataset_id}: {num_transitions:,} transitions, obs {obs_dim}, act {act_dim}; preset {task} "
          f"(lr {args.lr}, alpha {args.alpha}, nll_weight {args.nll_weight}, lr_decay {args.lr_decay}, batch "
          f"{args.batch_size}, expectile {args.expectile}, reward {args.reward_tune}); {args.pretrain_steps:,} pretraining "
          f"+ {args.total_timesteps:,} main steps on {device}; compile {args.compile}"
          + (" (the first steps compile: ~1 min on a CPU the first time, seconds once cached)" if args.compile else ""),
          flush=True)

    # ALGO LOGIC: initialize agent here
    stateful = build_agent(args, obs_dim, act_dim, device)  # networks and optimizers
    actor, critic_target, actor_optimizer = stateful["actor"], stateful["critic_target"], stateful["actor_optimizer"]
    optimizers = ((stateful["bc_optimizer"], args.lr), (actor_optimizer, args.lr),
                  (stateful["critic_optimizer"], args.critic_lr))
    global_step, eval_history = 0, []
    if checkpoint:
        for name, module in stateful.items():
            module.load_state_dict(checkpoint[name])
        for opt, base in optimizers:  # load_state_dict restored the saved lr: --lr / --critic-lr given now must win
            opt.param_groups[0]["lr"] = base  # (the cosine factor, where on, is applied on top in the loop)
        global_step, eval_history = checkpoint["global_step"], checkpoint["eval"]
        set_rng_states(checkpoint["rng"])
        print(f"resumed {run_name} at step {global_step:,}")

    def write_summary(wall_seconds: float, sps: float) -> None:
        returns = [e["mean_return"] for e in eval_history]
        scores = [e["normalized_score"] for e in eval_history if e.get("normalized_score") is not None]
        summary = {"args": asdict(args), "eval": eval_history, "final_eval_return": returns[-1] if returns else None,
                   "best_eval_return": max(returns) if returns else None, "sps": sps, "wall_seconds": wall_seconds,
                   "global_step": global_step, "pretrain_steps": args.pretrain_steps,
                   "kernels": "none (no reverse chain)", "precision": precision, "compile": args.compile,
                   "device": str(device), "preset": task, "best_normalized_score": max(scores) if scores else None,
                   "last_normalized_score": scores[-1] if scores else None,
                   # wall ms per gradient step of this session without evaluation: all steps, and main-loop steps only
                   "train_ms_per_step": 1000 * (time.time() - start_time - eval_seconds) / (global_step - start_step)
                   if global_step > start_step else None,
                   "main_ms_per_step": (1000 * (time.time() - main_start[1] - main_eval_seconds())
                                        / max(global_step - main_start[0], 1)) if main_start else None}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)

    def main_eval_seconds() -> float:  # evaluation time since the main loop started in this session
        return eval_seconds - main_start[2]

    def run_evaluation() -> None:
        global eval_seconds
        eval_start = time.time()
        policy = lambda obs: select_actions(actor, critic_target, obs, args.eval_candidates, args.eval_deterministic)  # noqa: E731
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

    loss_fns = (critic_loss, edm_loss, policy_loss)
    if args.compile:  # one fused forward+backward per loss
        loss_fns = tuple(compile_or_eager(f) for f in loss_fns)

    start_time, start_step = time.time(), global_step
    last_log = (global_step, start_time)  # (step, time) of the last status line
    prior_wall = checkpoint["wall_seconds"] if checkpoint else 0.0
    losses, eval_seconds = {}, 0.0  # time spent in evaluation, left out of the ms-per-step figures
    main_start = None  # (global_step, time, eval_seconds) when this session's first main-loop step began

    while global_step < total_steps:
        # ALGO LOGIC: training (train_step: pretraining, then the main loop)
        pretraining = global_step < args.pretrain_steps
        if not pretraining and main_start is None:
            main_start = (global_step, time.time(), eval_seconds)
        losses.update(train_step(args, stateful, data, global_step, loss_fns))
        global_step += 1

        # TRY NOT TO MODIFY: logging, evaluation and checkpoints at fixed gradient-step intervals; a status line also
        # every `status_interval` seconds, so that a slow run shows it is alive
        log_now, now = global_step % args.log_frequency == 0, time.time()
        if log_now or now - last_log[1] >= args.status_interval:
            values = {k: v.item() for k, v in losses.items()}
            if log_now:  # TensorBoard scalars stay step-based
                writer.add_scalar("charts/SPS", int((global_step - start_step) / (now - start_time)), global_step)
                writer.add_scalar("charts/learning_rate", actor_optimizer.param_groups[0]["lr"], global_step)
                writer.add_scalar("losses/alpha", args.alpha, global_step)
                for k, v in values.items():
                    writer.add_scalar(f"losses/{k}", v, global_step)
                writer.add_scalar("losses/qf_loss", (values["qf1_loss"] + values["qf2_loss"]) / 2, global_step)
            sps, last_log = (global_step - last_log[0]) / max(now - last_log[1], 1e-9), (global_step, now)  # recent
            eta = format_duration((total_steps - global_step) / sps) if sps > 0 else "?"
            last = eval_history[-1]["mean_return"] if eval_history else float("nan")
            text = f" | actor_loss {values['actor_loss']:.4g}" if "actor_loss" in values else ""
            print(f"step {global_step:>10,} | {'pretrain' if pretraining else 'main':8} | SPS {sps:>7.1f} | ETA {eta} | "
                  f"eval {last:10.2f} | qf1_loss {values['qf1_loss']:.4g} | bc_loss {values['bc_loss']:.4g}{text}",
                  flush=True)
        main_steps = global_step - args.pretrain_steps
        if main_steps > 0 and (main_steps % args.eval_frequency == 0 or global_step >= total_steps):
            run_evaluation()
            write_summary(prior_wall + time.time() - start_time, (global_step - start_step) / (time.time() - start_time))
            last_log = (global_step, time.time())  # the status line's SPS and ETA leave the evaluation out
        if args.save_model and (global_step % args.checkpoint_frequency == 0 or global_step >= total_steps):
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), checkpoint_state())

    if global_step == start_step and not eval_history:  # resumed at or past the end before any evaluation
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
