"""Small offline (Minari) datasets for the tests of the offline scripts; nothing here downloads anything.

Every helper writes under the Minari root that `MINARI_DATASETS_PATH` names at call time, so tests do
`monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))` first and pass the same variable to the
script they launch (tests/helpers.py `run_script(..., env={"MINARI_DATASETS_PATH": ...})`).

Datasets are built from `minari.data_collector.EpisodeBuffer`s filled with whole numpy arrays and
`minari.create_dataset_from_buffers`: `minari.DataCollector` (and `EpisodeBuffer.add_step_data`) need jax, which this
repo does not install. Reference scores are always passed explicitly; otherwise Minari runs 100 random-policy
episodes to estimate `ref_min_score`.

The bandit env is registered with gymnasium under `BANDIT_ENV_ID` with the entry point string
`"tests.offline_data:MultimodalBanditEnv"`. That string is what the dataset's env spec stores, so
`dataset.recover_environment()` works in any process that can import the `tests` folder of this repository as a
namespace package: a script launched as `python <repo>/diffusion_ql.py` has the repo root as `sys.path[0]`, and
pytest gets it from the root conftest.py. Nothing else has to be registered in the script's process.
"""

from __future__ import annotations

import gymnasium as gym
import minari
import numpy as np
import torch
from minari.data_collector import EpisodeBuffer

# Metadata Minari warns about when it is missing.
_AUTHOR, _EMAIL, _PERMALINK = "diffusion-rl tests", "tests@localhost", "tests/offline_data.py"

BANDIT_ENV_ID = "MultimodalBandit-v0"
BANDIT_ENTRY_POINT = "tests.offline_data:MultimodalBanditEnv"
# The Diffusion-QL paper's toy (Wang et al. 2023, Fig. 1): behaviour actions are a mixture of four Gaussian modes in
# a 2-D action box, each mode paying a different reward; a good offline agent should put its actions on the best one.
BANDIT_MODES = np.array([[0.8, 0.8], [0.8, -0.8], [-0.8, 0.8], [-0.8, -0.8]], dtype=np.float32)  # [4, 2]
BANDIT_MODE_REWARDS = np.array([1.0, 0.6, 0.4, 0.2], dtype=np.float32)  # mode 0 (top-right) is the best
BANDIT_MODE_STD = 0.05  # std of the behaviour data around each mode
BANDIT_REWARD_WIDTH = 0.2  # the reward of a mode decays as a Gaussian bump of this width around its centre


class MultimodalBanditEnv(gym.Env):
    """One-step bandit: a constant 1-D observation, a 2-D action in [-1, 1]^2, then `terminated=True`.

    reward(a) = max_k r_k * exp(-|a - mu_k|^2 / (2 w^2)): a smooth bump of height r_k around each mode centre mu_k,
    so an action is worth most when it sits on the best mode.
    """

    metadata = {"render_modes": []}

    def __init__(self, render_mode: str | None = None):
        self.render_mode = render_mode  # no rendering; accepted so generic env-making code can pass it
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        return np.zeros(1, dtype=np.float32), float(bandit_reward(np.asarray(action)[None])[0]), True, False, {}


def bandit_reward(actions: np.ndarray) -> np.ndarray:
    """actions [N, 2] -> rewards [N] of MultimodalBanditEnv."""
    sq = ((actions[:, None, :] - BANDIT_MODES[None]) ** 2).sum(-1)  # [N, 4]
    return (BANDIT_MODE_REWARDS[None] * np.exp(-sq / (2 * BANDIT_REWARD_WIDTH**2))).max(-1)


def bandit_mode_of(actions: np.ndarray, radius: float = 0.3) -> np.ndarray:
    """Index of the mode each action [N, 2] lies within `radius` of, or -1 if none: [N] int."""
    dist = np.sqrt(((actions[:, None, :] - BANDIT_MODES[None]) ** 2).sum(-1))  # [N, 4]
    return np.where(dist.min(-1) < radius, dist.argmin(-1), -1)


def register_bandit() -> None:
    """Registers BANDIT_ENV_ID with gymnasium (idempotent)."""
    if BANDIT_ENV_ID not in gym.registry:
        gym.register(BANDIT_ENV_ID, entry_point=BANDIT_ENTRY_POINT)


register_bandit()


def make_bandit_dataset(dataset_id: str = "toy/multimodal-bandit-v0", episodes: int = 1000, seed: int = 0):
    """Bandit dataset: `episodes` one-step episodes whose actions are drawn uniformly over the 4 modes, N(mu_k, 0.05^2),
    clipped to the box. ref_min_score = 0 and ref_max_score = 1 (the best mode's peak), so normalised score = return.
    """
    rng = np.random.default_rng(seed)
    modes = rng.integers(0, len(BANDIT_MODES), size=episodes)
    actions = np.clip(BANDIT_MODES[modes] + BANDIT_MODE_STD * rng.standard_normal((episodes, 2)), -1, 1)
    actions = actions.astype(np.float32)  # [episodes, 2]
    rewards = bandit_reward(actions)
    buffers = [
        EpisodeBuffer(id=i, observations=np.zeros((2, 1), dtype=np.float32), actions=actions[i : i + 1],
                      rewards=rewards[i : i + 1].astype(np.float64), terminations=np.array([True]),
                      truncations=np.array([False]))
        for i in range(episodes)
    ]
    spec = gym.spec(BANDIT_ENV_ID)
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env=spec, eval_env=spec, algorithm_name="mixture-of-gaussians behaviour",
        author=_AUTHOR, author_email=_EMAIL, code_permalink=_PERMALINK,
        ref_min_score=0.0, ref_max_score=float(BANDIT_MODE_REWARDS.max()), description="Diffusion-QL toy bandit")


def make_mujoco_dataset(dataset_id: str = "test/hopper/random-v0", env_id: str = "Hopper-v5", episodes: int = 6,
                        max_steps: int = 40, seed: int = 0, ref_min_score: float = -20.0, ref_max_score: float = 3234.0):
    """Small MuJoCo dataset collected with a random policy.

    Even episodes use full-scale uniform random actions (Hopper falls within ~10-40 steps: `terminated`); odd episodes
    use actions scaled by 0.05, which keep Hopper upright until the `max_steps` cut (`truncated`). The env is reset with
    seed `seed + episode index`. Raises if the defaults stop producing at least one episode of each kind, so the tests
    that rely on both cannot pass vacuously. Default ref scores are D4RL's hopper ones (raw-return scale only).
    """
    env = gym.make(env_id)
    env.action_space.seed(seed)
    buffers = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        scale = 1.0 if ep % 2 == 0 else 0.05
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        for t in range(max_steps):
            action = (scale * env.action_space.sample()).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            truncated = truncated or (t == max_steps - 1 and not terminated)
            observations.append(obs), actions.append(action), rewards.append(reward)
            terms.append(terminated), truncs.append(truncated)
            if terminated or truncated:
                break
        buffers.append(EpisodeBuffer(id=ep, seed=seed + ep, observations=np.stack(observations).astype(np.float64),
                                     actions=np.stack(actions), rewards=np.array(rewards, dtype=np.float64),
                                     terminations=np.array(terms), truncations=np.array(truncs)))
    if not any(b.terminations[-1] for b in buffers) or not any(b.truncations[-1] for b in buffers):
        raise RuntimeError(f"make_mujoco_dataset({env_id}, episodes={episodes}, max_steps={max_steps}) produced no "
                           "terminated or no truncated episode; change episodes/max_steps/seed")
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env=env.spec, eval_env=env.spec, algorithm_name="random policy",
        author=_AUTHOR, author_email=_EMAIL, code_permalink=_PERMALINK,
        ref_min_score=ref_min_score, ref_max_score=ref_max_score, description="test data (random policy)",
        requirements=["mujoco>=3", "gymnasium>=1.1"])


# Raw rewards of the goal dataset's three episodes: sparse goal rewards as in Minari's antmaze data (1 while the agent
# is at the goal, 0 elsewhere), episodes that never terminate (the last is truncated) and, in episode 1, a reward of 1
# that repeats while the agent stays at the goal, as in a continuing task.
GOAL_EPISODE_REWARDS = ([0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0])
GOAL_ACTION_OVERSHOOT = 1.02  # one stored action beyond the [-1, 1] box, as behaviour data can hold


def make_goal_dataset(dataset_id: str = "test/antmaze/goal-v0", terminate_last: bool = False):
    """A small antmaze-style dataset on the bandit env's spaces: `GOAL_EPISODE_REWARDS` as rewards, never terminated
    (each episode truncated at its end), unless `terminate_last` terminates the last episode. The first action of
    episode 0 is (GOAL_ACTION_OVERSHOOT, -GOAL_ACTION_OVERSHOOT), outside the action box; the rest are in it. The
    env part of the default id is "antmaze", so the offline scripts apply their antmaze defaults to it."""
    buffers = []
    for i, rewards in enumerate(GOAL_EPISODE_REWARDS):
        n = len(rewards)
        actions = np.tile(np.array([[0.5, -0.5]], np.float32), (n, 1))
        if i == 0:
            actions[0] = [GOAL_ACTION_OVERSHOOT, -GOAL_ACTION_OVERSHOOT]
        last = i == len(GOAL_EPISODE_REWARDS) - 1 and terminate_last
        buffers.append(EpisodeBuffer(id=i, observations=np.arange(n + 1, dtype=np.float32)[:, None] / 10,
                                     actions=actions, rewards=np.array(rewards, dtype=np.float64),
                                     terminations=np.array([False] * (n - 1) + [last]),
                                     truncations=np.array([False] * (n - 1) + [not last])))
    spec = gym.spec(BANDIT_ENV_ID)
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env=spec, eval_env=spec, algorithm_name="scripted goal rewards", author=_AUTHOR,
        author_email=_EMAIL, code_permalink=_PERMALINK, ref_min_score=0.0, ref_max_score=1.0,
        description="antmaze-style sparse goal rewards, no terminations")


def check_goal_terminals(script, reward_tune: str) -> tuple[dict, torch.Tensor, int]:
    """What both offline scripts' antmaze tests share: goal terminals are on by default for antmaze datasets only, and
    on the goal dataset they mark exactly its 4 reward-1 steps (Minari's own terminations: none). Returns the marked
    tensors, the raw rewards and the number of goal steps, for each script's own checks of rewards and actions."""
    dataset = make_goal_dataset()
    goal_steps = sum(r == 1.0 for ep in GOAL_EPISODE_REWARDS for r in ep)
    assert goal_steps == 4
    resolve = script.resolve_preset
    assert resolve(script.Args(dataset_id="D4RL/antmaze/umaze-v1"))[0].goal_terminals is True
    assert resolve(script.Args(dataset_id="mujoco/hopper/medium-v0"))[0].goal_terminals is False
    assert resolve(script.Args(dataset_id="D4RL/antmaze/umaze-v1", goal_terminals=False))[0].goal_terminals is False
    marked = script.dataset_tensors(dataset, reward_tune, torch.device("cpu"), goal_terminals=True)
    plain = script.dataset_tensors(dataset, reward_tune, torch.device("cpu"), goal_terminals=False)
    raw = torch.tensor([r for ep in GOAL_EPISODE_REWARDS for r in ep])
    assert int((marked["not_dones"] == 0).sum()) == goal_steps
    assert torch.equal(marked["not_dones"].reshape(-1) == 0, raw == 1.0)  # exactly the goal steps
    assert int((plain["not_dones"] == 0).sum()) == 0
    return marked, raw, goal_steps
