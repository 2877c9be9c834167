"""benchmarks/datasets/pointmaze.py: the grid search, the waypoint + PD controller, episode cutting, and a few
hundred steps written as a Minari dataset that diffusion_ql.py and dtql.py train on and evaluate in the recovered env."""

import sys

import gymnasium as gym
import gymnasium_robotics
import numpy as np
import pytest
from helpers import REPO, read_summary, run_dirs, run_script

sys.path.insert(0, str(REPO / "benchmarks" / "datasets"))
import pointmaze  # noqa: E402

gym.register_envs(gymnasium_robotics)
UMAZE = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]


def test_dfs_path_follows_free_neighbouring_cells():
    path = pointmaze.dfs_waypoints(UMAZE, (3, 1), (1, 1))
    walk, cell = [(3, 1)], (3, 1)
    while cell != (1, 1):
        cell = path[cell]
        walk.append(cell)
    assert walk == [(3, 1), (3, 2), (3, 3), (2, 3), (1, 3), (1, 2), (1, 1)]  # the only way round the U
    assert pointmaze.dfs_waypoints(UMAZE, (1, 2), (1, 2)) == {}
    with pytest.raises(ValueError, match="no path"):
        pointmaze.dfs_waypoints([[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1]], (1, 1), (1, 3))
    # the search order decides among equal paths. Open 3x3 room from its centre: (2,3), (2,1), (1,2), (3,2) are
    # pushed; (3,2) is expanded first, then (3,1), (3,3), then (1,2), which discovers (1,1): the path goes up first
    room = [[1] * 5] + [[1, 0, 0, 0, 1] for _ in range(3)] + [[1] * 5]
    assert pointmaze.dfs_waypoints(room, (2, 2), (1, 1)) == {(2, 2): (1, 2), (1, 2): (1, 1)}


def test_controller_pd_law_waypoints_and_replanning():
    env = gym.make("PointMaze_UMaze-v3")
    maze = env.unwrapped.maze
    ctrl = pointmaze.WaypointController(maze, np.random.default_rng(0))
    start, goal = maze.cell_rowcol_to_xy(np.array([3, 1])), maze.cell_rowcol_to_xy(np.array([1, 1])) + 0.1
    vel = np.array([0.3, -0.2])
    obs = {"observation": np.r_[start, vel], "achieved_goal": start, "desired_goal": goal}
    action = ctrl(obs)
    first = maze.cell_rowcol_to_xy(np.array([3, 2]))  # the centre of the next cell on the path, no jitter
    np.testing.assert_allclose(action, 10 * (first - start) - vel)
    # within 0.1 of the waypoint: the next one, the centre of (3, 3) minus U(0, 0.2) jitter per coordinate
    near = first + 0.05
    action = ctrl({"observation": np.r_[near, 0, 0], "achieved_goal": near, "desired_goal": goal})
    target = action / 10 + near
    offset = maze.cell_rowcol_to_xy(np.array([3, 3])) - target
    assert ctrl.target_cell == (3, 3) and np.all((offset >= 0) & (offset <= 0.2)) and np.any(offset > 0)
    # a new goal re-plans from the current cell
    new_goal = maze.cell_rowcol_to_xy(np.array([3, 1]))
    ctrl({"observation": np.r_[near, 0, 0], "achieved_goal": near, "desired_goal": new_goal})
    assert ctrl.target_cell == (3, 1)


def test_collect_cuts_episodes_at_successes_without_resets(monkeypatch):
    env = gym.make("PointMaze_UMaze-v3", continuing_task=True, reset_target=True, max_episode_steps=1_000_000)
    episodes = pointmaze.collect(env, 400, seed=123, noise_std=0.5, rng=np.random.default_rng(0))
    assert sum(len(e.actions) for e in episodes) == 400 and len(episodes) >= 3  # the controller reaches goals
    for ep in episodes:
        n = len(ep.actions)
        assert ep.observations["observation"].shape == (n + 1, 4) and ep.infos["qpos"].shape == (n + 1, 2)
        assert not ep.terminations.any() and ep.truncations.tolist() == [False] * (n - 1) + [True]
        assert np.all(np.abs(ep.actions) <= 1) and ep.actions.dtype == np.float32
        # sparse reward: 1 exactly where the agent is within 0.45 of the goal; every cut but the last is a success
        assert set(np.unique(ep.rewards)) <= {0.0, 1.0}
        np.testing.assert_array_equal(ep.rewards, ep.infos["success"][1:].astype(float))
    for ep in episodes[:-1]:
        assert ep.infos["success"][-1] and ep.rewards[-1] == 1.0
    for prev, nxt in zip(episodes, episodes[1:]):  # no reset: the next episode starts where the last one ended
        for key in ("observation", "achieved_goal", "desired_goal"):
            np.testing.assert_array_equal(prev.observations[key][-1], nxt.observations[key][0])
    # the noise: N(0, 0.5^2) added to the controller's action, then clipped. With a controller that always says 0
    # the recorded actions are exactly the clipped noise draws of the seeded generator, one pair per step.
    monkeypatch.setattr(pointmaze.WaypointController, "__call__", lambda self, obs: np.zeros(2))
    zero = pointmaze.collect(gym.make("PointMaze_UMaze-v3", continuing_task=True, reset_target=True,
                                      max_episode_steps=1_000_000), 400, 123, 0.5, np.random.default_rng(7))
    actions = np.concatenate([e.actions for e in zero])
    expected = np.clip(0.5 * np.random.default_rng(7).standard_normal((400, 2)), -1, 1).astype(np.float32)
    np.testing.assert_array_equal(actions, expected)


def test_generated_dataset_trains_and_evaluates_in_both_offline_scripts(tmp_path, minari_root):
    dataset = pointmaze.generate(pointmaze.Args(maze="umaze", namespace="testregen", num_steps=300, ref_episodes=2))
    assert dataset.spec.dataset_id == "testregen/pointmaze/umaze-v2" and dataset.total_steps == 300
    meta = dataset.storage.metadata
    assert meta["ref_max_score"] > meta["ref_min_score"] >= 0  # controller beats random in the eval env
    eval_env = dataset.recover_environment(eval_env=True)
    assert eval_env.spec.id == "PointMaze_UMaze-v3" and eval_env.spec.max_episode_steps == 300
    assert eval_env.spec.kwargs["maze_map"] == pointmaze.EVAL_MAPS["umaze"]
    assert eval_env.spec.kwargs["reset_target"] is False
    assert (minari_root / "testregen" / "pointmaze" / "umaze-v2").is_dir()
    env = {"MINARI_DATASETS_PATH": str(minari_root), "OMP_NUM_THREADS": "1"}
    small = ["--dataset-id", "testregen/pointmaze/umaze-v2", "--batch-size", "16", "--hidden-dim", "16",
             "--eval-episodes", "1", "--eval-candidates", "4", "--log-frequency", "2", "--no-compile"]
    for script, budget in (("diffusion_ql.py", ["--total-timesteps", "4", "--eval-frequency", "4"]),
                           ("dtql.py", ["--pretrain-steps", "2", "--total-timesteps", "2", "--eval-frequency", "2"])):
        cwd = tmp_path / script
        cwd.mkdir()
        run_script(script, *small, *budget, cwd=cwd, env=env)
        (run_dir,) = run_dirs(cwd)
        summary = read_summary(run_dir)
        assert len(summary["eval"]) == 1 and summary["eval"][0]["normalized_score"] is not None
        expected = 100 * (summary["eval"][0]["mean_return"] - meta["ref_min_score"]) / (
            meta["ref_max_score"] - meta["ref_min_score"])
        assert summary["eval"][0]["normalized_score"] == pytest.approx(expected)
