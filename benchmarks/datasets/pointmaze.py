"""Regenerates Minari's D4RL PointMaze datasets (umaze, medium; sparse reward) on a CPU, under its own namespace.

The official datasets (D4RL/pointmaze/{umaze,medium}-v2) come from a scripted controller, not a trained policy, so
they can be rebuilt here. This follows the recipe of Farama's minari-dataset-generation-scripts
(scripts/pointmaze/create_pointmaze_dataset.py + controller.py + maze_solver.py), re-implemented:

- env: `PointMaze_UMaze-v3` / `PointMaze_Medium-v3` (gymnasium-robotics, sparse reward), `continuing_task=True,
  reset_target=True`, a time limit of 1e6 steps (never reached), reset once with seed 123;
- controller: a waypoint path over the maze grid from the agent's cell to the goal's cell (the recipe's controller
  defaults to its depth-first search, the one its script ends up using; the dataset metadata says QIteration), then
  a PD controller `10 (target_xy - xy) - 1 * velocity`; a waypoint counts as reached within 0.1; the first waypoint
  of a plan is a cell centre, later ones are cell centres minus U(0, 0.2) per coordinate, and the goal's own
  position replaces the goal cell's centre when it is reached as a later waypoint;
- noise: N(0, 0.5^2) added to every action, then clipped to [-1, 1];
- episodes: one continuing trajectory of 1,000,000 steps, cut (truncated) at every step where `info["success"]`;
  the next episode starts from the last observation (no reset); the final, unfinished piece is kept, truncated;
- reference scores: Minari's own procedure with the recipe's eval env (same env id, the single-goal maze map,
  `continuing_task=True, reset_target=False`, the registered time limit: 300 steps umaze, 600 medium): mean return of
  100 episodes of a uniform random policy (ref_min_score) and of the noiseless controller (ref_max_score).

Differences from the official files are listed in benchmarks/datasets/README.md.

Usage (one command per dataset; writes under MINARI_DATASETS_PATH, default ~/.minari/datasets):
    python benchmarks/datasets/pointmaze.py --maze umaze      # -> regen/pointmaze/umaze-v2
    python benchmarks/datasets/pointmaze.py --maze medium     # -> regen/pointmaze/medium-v2
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np

# The eval maps of the recipe: the training maze with its one goal cell marked "g" (agent reset: any free cell).
G = "g"
EVAL_MAPS = {
    "umaze": [[1, 1, 1, 1, 1],
              [1, G, 0, 0, 1],
              [1, 1, 1, 0, 1],
              [1, 0, 0, 0, 1],
              [1, 1, 1, 1, 1]],
    "medium": [[1, 1, 1, 1, 1, 1, 1, 1],
               [1, 0, 0, 1, 1, 0, 0, 1],
               [1, 0, 0, 1, 0, 0, 0, 1],
               [1, 1, 0, 0, 0, 1, 1, 1],
               [1, 0, 0, 1, 0, 0, 0, 1],
               [1, 0, 1, 0, 0, 1, 0, 1],
               [1, 0, 0, 0, 1, 0, G, 1],
               [1, 1, 1, 1, 1, 1, 1, 1]],
}
ENV_IDS = {"umaze": "PointMaze_UMaze-v3", "medium": "PointMaze_Medium-v3"}
# Neighbour order of the recipe's grid search, as (row, col) offsets; it decides which path a search returns.
NEIGHBOURS = ((0, 1), (0, -1), (-1, 0), (1, 0))

Cell = tuple[int, int]


@dataclass
class Args:
    maze: Literal["umaze", "medium"] = "umaze"
    """which maze to regenerate"""
    namespace: str = "regen"
    """Minari namespace of the written dataset: <namespace>/pointmaze/<maze>-v2 (kept apart from the official D4RL/)"""
    num_steps: int = 1_000_000
    """environment steps to record (the official datasets have 1,000,000)"""
    seed: int = 123
    """seed of the env reset (as the recipe) and of the action noise and waypoint jitter (unseeded in the recipe)"""
    noise_std: float = 0.5
    """std of the Gaussian noise added to every controller action before clipping to [-1, 1]"""
    ref_episodes: int = 100
    """episodes of the random and of the expert policy that set ref_min_score and ref_max_score"""


def is_free(maze_map: list[list], cell: Cell) -> bool:
    """A cell inside the map that is not a wall (the map's border is walls, so negative indices never matter)."""
    i, j = cell
    return 0 <= i < len(maze_map) and 0 <= j < len(maze_map[0]) and maze_map[i][j] != 1


def dfs_waypoints(maze_map: list[list], start: Cell, goal: Cell) -> dict[Cell, Cell]:
    """Path from `start` to `goal` as {cell: next cell}, found by depth-first search (a stack; a cell is marked
    visited when pushed; neighbours in NEIGHBOURS order). Empty when start == goal."""
    parent: dict[Cell, Cell] = {}
    stack, seen = [start], {start}
    while stack:
        cell = stack.pop()
        if cell == goal:
            break
        for di, dj in NEIGHBOURS:
            nxt = (cell[0] + di, cell[1] + dj)
            if is_free(maze_map, nxt) and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
                parent[nxt] = cell
    if goal != start and goal not in parent:
        raise ValueError(f"no path from {start} to {goal} in the maze")
    path, cell = {}, goal
    while cell != start:
        path[parent[cell]] = cell
        cell = parent[cell]
    return path


class WaypointController:
    """Follows the grid path to the goal with a PD law; re-plans whenever the goal moves. Stateful (it remembers the
    waypoint it is heading to), so the data-collecting policy is not Markovian, as in the official datasets."""

    def __init__(self, maze, rng: np.random.Generator, kp: float = 10.0, kd: float = -1.0, threshold: float = 0.1,
                 jitter: float = 0.2):
        self.maze, self.rng, self.kp, self.kd, self.threshold, self.jitter = maze, rng, kp, kd, threshold, jitter
        self.goal_xy: np.ndarray | None = None
        self.target_cell: Cell | None = None

    def cell(self, xy: np.ndarray) -> Cell:
        i, j = self.maze.cell_xy_to_rowcol(xy)
        return int(i), int(j)

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """obs: the env's dict (observation [4] = x, y, vx, vy; achieved_goal [2]; desired_goal [2]) -> action [2]."""
        xy, goal = obs["achieved_goal"], obs["desired_goal"]
        if self.goal_xy is None or np.linalg.norm(self.goal_xy - goal) > 1e-3:  # new goal: plan a new path
            self.goal_xy, self.goal_cell = goal.copy(), self.cell(goal)
            self.path = dfs_waypoints(self.maze.maze_map, self.cell(xy), self.goal_cell)
            if self.path:  # head for the centre of the next cell (the goal's cell centre too: success is within 0.45)
                self.target_cell = self.path[self.cell(xy)]
                self.target_xy = self.maze.cell_rowcol_to_xy(np.array(self.target_cell))
            else:  # already in the goal's cell: straight to the goal. As the recipe, the waypoint id stays the
                # previous one (it is the goal's cell unless the last goal was reached from a neighbouring cell)
                self.target_cell = self.goal_cell if self.target_cell is None else self.target_cell
                self.path[self.target_cell] = self.target_cell
                self.target_xy = self.goal_xy
        if np.linalg.norm(self.target_xy - xy) <= self.threshold and self.target_cell != self.goal_cell:
            self.target_cell = self.path[self.target_cell]  # waypoint reached: the next one, jittered by -U(0, 0.2)
            self.target_xy = (self.goal_xy if self.target_cell == self.goal_cell else
                              self.maze.cell_rowcol_to_xy(np.array(self.target_cell)) - self.rng.uniform(size=2) * self.jitter)
        return self.kp * (self.target_xy - xy) + self.kd * obs["observation"][2:]


def collect(env: gym.Env, num_steps: int, seed: int, noise_std: float, rng: np.random.Generator) -> list:
    """Steps the continuing env `num_steps` times with the noisy controller; returns Minari EpisodeBuffers cut at every
    success (truncation), each starting from the previous one's last observation."""
    from minari.data_collector import EpisodeBuffer

    controller = WaypointController(env.unwrapped.maze, rng)
    obs, info = env.reset(seed=seed)
    episodes, ep = [], None

    def new_episode(first_obs, first_info):
        return {"obs": [first_obs], "actions": [], "rewards": [], "success": [first_info.get("success", False)],
                "qpos": [first_obs["observation"][:2]], "qvel": [first_obs["observation"][2:]],
                "goal": [first_obs["desired_goal"]]}

    def close(ep, truncated_last: bool):
        n = len(ep["actions"])
        truncations = np.zeros(n, dtype=bool)
        truncations[-1] = truncated_last
        observations = {k: np.stack([o[k] for o in ep["obs"]]) for k in ep["obs"][0]}  # [T+1, d] per key
        infos = {"success": np.array(ep["success"]), "qpos": np.stack(ep["qpos"]), "qvel": np.stack(ep["qvel"]),
                 "goal": np.stack(ep["goal"])}
        episodes.append(EpisodeBuffer(id=len(episodes), observations=observations, actions=np.stack(ep["actions"]),
                                      rewards=np.array(ep["rewards"], dtype=np.float64),
                                      terminations=np.zeros(n, dtype=bool), truncations=truncations, infos=infos))

    ep = new_episode(obs, info)
    for _ in range(num_steps):
        action = controller(obs) + rng.standard_normal(2) * noise_std
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        ep["obs"].append(obs), ep["actions"].append(action), ep["rewards"].append(reward)
        ep["success"].append(info["success"]), ep["qpos"].append(obs["observation"][:2])
        ep["qvel"].append(obs["observation"][2:]), ep["goal"].append(obs["desired_goal"])
        if info["success"] or terminated or truncated:  # the recipe's cut: the goal was reached at this step
            close(ep, True)
            ep = new_episode(obs, info)
    if ep["actions"]:  # the last, unfinished piece of the trajectory
        close(ep, True)
    return episodes


def make_eval_env(maze: str) -> gym.Env:
    """The recipe's eval env: same env id, a single fixed goal cell, the goal never moves, registered time limit."""
    return gym.make(ENV_IDS[maze], maze_map=EVAL_MAPS[maze], continuing_task=True, reset_target=False)


def generate(args: Args):
    import gymnasium_robotics
    import minari

    gym.register_envs(gymnasium_robotics)
    dataset_id = f"{args.namespace}/pointmaze/{args.maze}-v2"
    rng = np.random.default_rng(args.seed)
    env = gym.make(ENV_IDS[args.maze], continuing_task=True, reset_target=True, max_episode_steps=1_000_000)
    start = time.time()
    episodes = collect(env, args.num_steps, args.seed, args.noise_std, rng)
    print(f"{dataset_id}: {args.num_steps:,} steps, {len(episodes):,} episodes in {time.time() - start:.0f} s", flush=True)
    eval_env = make_eval_env(args.maze)
    expert = WaypointController(eval_env.unwrapped.maze, np.random.default_rng(args.seed))  # noiseless
    dataset = minari.create_dataset_from_buffers(
        dataset_id, episodes, env=env.spec, eval_env=eval_env.spec, algorithm_name="DFS waypoints + PD controller",
        author="diffusion-rl", author_email="diffusion-rl@localhost", code_permalink="benchmarks/datasets/pointmaze.py",
        expert_policy=expert, num_episodes_average_score=args.ref_episodes,
        description=f"Regeneration of D4RL/pointmaze/{args.maze}-v2 with the official recipe (see "
                    "benchmarks/datasets/README.md for the differences)",
        requirements=["gymnasium-robotics>=1.4", "mujoco>=3"])
    meta = dataset.storage.metadata
    print(f"{dataset_id}: ref_min_score {meta['ref_min_score']:.2f}, ref_max_score {meta['ref_max_score']:.2f} "
          f"({args.ref_episodes} episodes each); total {time.time() - start:.0f} s", flush=True)
    return dataset


if __name__ == "__main__":
    import tyro

    generate(tyro.cli(Args))
