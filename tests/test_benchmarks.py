"""benchmarks/benchmark.py (the grid launcher: local pool, submitit job arrays, skip/resume) and benchmarks/report.py
(table over seeds, learning-curve PNGs)."""

import json
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import REPO, read_summary

sys.path.insert(0, str(REPO / "benchmarks"))
import benchmark  # noqa: E402
import report  # noqa: E402

# dacer.py at test size (tests/test_dacer.py's smoke flags): 120 env steps, evaluations at 60 and 120, checkpoints.
TINY_DACER = ("--max-episode-steps 20 --num-envs 2 --learning-starts 40 --batch-size 16 --hidden-dim 32 "
              "--diffusion-steps 5 --alpha-frequency 5 --entropy-samples 8 --em-iterations 5 --eval-frequency 60 "
              "--eval-episodes 2 --log-frequency 20 --checkpoint-frequency 60")

# A stand-in script with the scripts' interface: --env-id, --seed, --total-timesteps, --save-model, --resume; it
# writes runs/{run_name}/summary.json and checkpoint.pt, and records its thread setting and start/end times.
FAKE = textwrap.dedent('''
    import json, os, sys, time
    argv = sys.argv[1:]
    def flag(name, default=None):
        return argv[argv.index(name) + 1] if name in argv else default
    total = int(flag("--total-timesteps", 10))
    if flag("--resume"):
        run_dir = os.path.dirname(flag("--resume"))
        args = json.load(open(os.path.join(run_dir, "summary.json")))["args"]
    else:
        args = {"env_id": flag("--env-id"), "seed": int(flag("--seed")), "exp_name": "fake"}
        run_dir = os.path.join("runs", f"{args['env_id']}__fake__{args['seed']}__{time.time_ns()}")
        os.makedirs(run_dir)
    args["total_timesteps"] = total
    start = time.time()
    time.sleep(0.5)
    step = min(total, int(flag("--stop-at", total)))
    json.dump({"args": args, "global_step": step, "eval": []}, open(os.path.join(run_dir, "summary.json"), "w"))
    if "--save-model" in argv:
        open(os.path.join(run_dir, "checkpoint.pt"), "w").write("ckpt")
    with open("trace.jsonl", "a") as f:
        f.write(json.dumps({"seed": args["seed"], "start": start, "end": time.time(), "resumed": bool(flag("--resume")),
                            "omp": os.environ.get("OMP_NUM_THREADS"), "step": step}) + "\\n")
''')


def fake_script(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(FAKE)
    return str(path)


def trace(runs_dir):
    return [json.loads(line) for line in (runs_dir / "trace.jsonl").read_text().splitlines()]


def test_pool_limits_workers_sets_one_thread_and_skips_finished(tmp_path, capsys):
    runs_dir = tmp_path / "grid"
    args = benchmark.Args(scripts=[fake_script(tmp_path)], env_ids=["A-v0", "B-v0"], num_seeds=2, workers=2,
                          runs_dir=str(runs_dir), extra="--total-timesteps 10")
    assert benchmark.main(args) == [0, 0, 0, 0]
    calls = trace(runs_dir)
    assert len(calls) == 4 and {c["omp"] for c in calls} == {"1"}
    # never more than 2 runs at once: at every start, count the runs alive
    concurrent = max(sum(c["start"] <= d["start"] < c["end"] for c in calls) for d in calls)
    assert concurrent == 2
    assert sorted(p.name.rsplit("__", 1)[0] for p in (runs_dir / "runs").iterdir()) == [
        "A-v0__fake__1", "A-v0__fake__2", "B-v0__fake__1", "B-v0__fake__2"]
    # rerun: everything finished, nothing is launched
    capsys.readouterr()
    assert benchmark.main(args) == [0, 0, 0, 0]
    assert len(trace(runs_dir)) == 4 and capsys.readouterr().out.count("skip") == 4


def test_interrupted_run_is_resumed_from_its_checkpoint(tmp_path):
    runs_dir = tmp_path / "grid"
    script = fake_script(tmp_path)
    # a run that stopped at step 4 of 10 (as if killed): it has a checkpoint and an unfinished summary
    interrupted = benchmark.Args(scripts=[script], env_ids=["A-v0"], num_seeds=1, runs_dir=str(runs_dir),
                                 extra="--total-timesteps 10 --stop-at 4")
    benchmark.main(interrupted)
    (run_dir,) = (runs_dir / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 4
    args = benchmark.Args(scripts=[script], env_ids=["A-v0"], num_seeds=1, runs_dir=str(runs_dir),
                          extra="--total-timesteps 10")
    action, command = benchmark.plan(benchmark.expand(args)[0])
    assert action == "resume" and command[command.index("--resume") + 1] == str(run_dir / "checkpoint.pt")
    assert "--env-id" not in command and "--save-model" in command
    benchmark.main(args)
    assert [c["resumed"] for c in trace(runs_dir)] == [False, True]
    assert list((runs_dir / "runs").iterdir()) == [run_dir]  # same run directory
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 10
    # a larger budget than the finished run's resumes it again; the same budget skips it
    assert benchmark.plan(benchmark.expand(args)[0])[0] == "skip"
    more = benchmark.Args(scripts=[script], env_ids=["A-v0"], num_seeds=1, runs_dir=str(runs_dir),
                          extra="--total-timesteps 20")
    assert benchmark.plan(benchmark.expand(more)[0])[0] == "resume"


def test_offline_scripts_get_dataset_id_and_exp_name_sets_the_prefix(tmp_path):
    args = benchmark.Args(scripts=["diffusion_ql.py", "dacer.py"], env_ids=["regen/pointmaze/umaze-v2"], num_seeds=1,
                          start_seed=3, runs_dir=str(tmp_path), extra="--exp-name mine --total-timesteps 5")
    offline, online = benchmark.expand(args)
    assert benchmark.plan(offline)[1][2:4] == ["--dataset-id", "regen/pointmaze/umaze-v2"]
    assert benchmark.plan(online)[1][2:4] == ["--env-id", "regen/pointmaze/umaze-v2"]
    assert offline.seed == 3 and offline.prefix == "regen_pointmaze_umaze-v2__mine__3__"
    with pytest.raises(SystemExit, match="no script"):
        benchmark.expand(benchmark.Args(scripts=["nope.py"], runs_dir=str(tmp_path)))


def test_local_grid_of_real_runs_then_resume_and_report(tmp_path):
    """dacer.py on Pendulum-v1, 2 seeds, 2 workers, to 120 env steps; the rerun with 160 resumes both; the report
    aggregates them."""
    runs_dir = tmp_path / "grid"
    base = dict(scripts=["dacer.py"], env_ids=["Pendulum-v1"], num_seeds=2, workers=2, runs_dir=str(runs_dir))
    assert benchmark.main(benchmark.Args(**base, extra=TINY_DACER + " --total-timesteps 120")) == [0, 0]
    dirs = sorted((runs_dir / "runs").iterdir())
    assert [d.name.rsplit("__", 1)[0] for d in dirs] == ["Pendulum-v1__dacer__1", "Pendulum-v1__dacer__2"]
    for d in dirs:
        assert read_summary(d)["global_step"] == 120 and (d / "checkpoint.pt").is_file()
    assert benchmark.main(benchmark.Args(**base, extra=TINY_DACER + " --total-timesteps 160")) == [0, 0]
    assert sorted((runs_dir / "runs").iterdir()) == dirs
    for d in dirs:
        summary = read_summary(d)
        assert summary["global_step"] == 160 and [e["step"] for e in summary["eval"]] == [60, 120, 160]
        log = (runs_dir / "logs" / (d.name.rsplit("__", 1)[0] + ".log")).read_text()
        assert "resumed" in log and "at step 120" in log

    text = report.main(report.Args(runs=[str(runs_dir)], out=str(tmp_path / "out"), title="tiny"))
    finals = [read_summary(d)["final_eval_return"] for d in dirs]
    bests = [read_summary(d)["best_eval_return"] for d in dirs]
    row = next(line for line in text.splitlines() if line.startswith("| Pendulum-v1 | dacer"))
    assert "| 2 (1, 2) | 160 env |" in row
    assert f"{np.mean(finals):.1f} ± {np.std(finals):.1f}" in row and f"{np.mean(bests):.1f} ± {np.std(bests):.1f}" in row
    assert (tmp_path / "out" / "Pendulum-v1.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "report.md").read_text().startswith("# tiny")


def test_submitit_debug_executor_submits_execute_with_the_runs(tmp_path):
    runs_dir = tmp_path / "grid"
    args = benchmark.Args(scripts=[fake_script(tmp_path)], env_ids=["A-v0"], num_seeds=2, runs_dir=str(runs_dir),
                          extra="--total-timesteps 10", backend="slurm", slurm_cluster="debug", slurm_cpus=3,
                          slurm_time_min=5, wait=False)
    jobs = benchmark.main(args)
    assert len(jobs) == 2
    submission = jobs[0].submission()
    assert submission.function is benchmark.execute
    (run,) = submission.args
    assert run == benchmark.expand(args)[0] and run.threads == 3 and run.seed == 1
    assert [job.result() for job in jobs] == [0, 0]  # the debug executor runs the function at result()
    assert sorted(c["seed"] for c in trace(runs_dir)) == [1, 2] and {c["omp"] for c in trace(runs_dir)} == {"3"}


def test_submitit_local_executor_runs_a_real_job_array(tmp_path):
    """submitit's local executor pickles `execute` and its Run into files and runs them in fresh processes, as
    Slurm would; the job array here is dacer.py on Pendulum-v1, one seed, 60 env steps."""
    runs_dir = tmp_path / "grid"
    args = benchmark.Args(scripts=["dacer.py"], env_ids=["Pendulum-v1"], num_seeds=1, runs_dir=str(runs_dir),
                          extra=TINY_DACER + " --total-timesteps 60", backend="slurm", slurm_cluster="local",
                          slurm_time_min=10)
    assert benchmark.main(args) == [0]
    (run_dir,) = (runs_dir / "runs").iterdir()
    assert read_summary(run_dir)["global_step"] == 60
    assert list((runs_dir / "logs" / "submitit").glob("*_submitted.pkl"))


def write_run(root, script, task, seed, evals, offline=False, sps=100.0, steps=None, **extra_args):
    """A run folder as the scripts write it: summary.json and TensorBoard eval scalars."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = root / f"{task.replace('/', '_')}__{script}__{seed}__{time.time_ns()}"
    run_dir.mkdir(parents=True)
    key = "dataset_id" if offline else "env_id"
    returns = [v for _, v in evals]
    summary = {"args": {"exp_name": script, key: task, "seed": seed, "total_timesteps": evals[-1][0], **extra_args},
               "eval": [{"step": s, "mean_return": v} for s, v in evals], "final_eval_return": returns[-1],
               "best_eval_return": max(returns), "sps": sps, "global_step": steps or evals[-1][0]}
    if offline:  # with reference scores: the normalized score is the metric
        summary.update(last_normalized_score=10 * returns[-1], best_normalized_score=10 * max(returns))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    writer = SummaryWriter(str(run_dir))
    for s, v in evals:
        writer.add_scalar("eval/episodic_return", v, s)
        if offline:
            writer.add_scalar("eval/normalized_score", 10 * v, s)
    writer.close()
    return run_dir


def test_report_table_curves_and_dedup(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, "sdac", "Hopper-v5", 1, [(10, 1.0), (20, 3.0)], sps=100)
    write_run(runs, "sdac", "Hopper-v5", 2, [(10, 2.0), (20, 5.0), (30, 4.0)], sps=300)
    write_run(runs, "sdac", "Hopper-v5", 2, [(10, 99.0)], steps=10)  # an earlier, shorter try of seed 2: ignored
    write_run(runs, "dtql", "regen/pointmaze/umaze-v2", 1, [(5, 1.0), (10, 2.0)], offline=True, pretrain_steps=4)
    found = report.find_runs([str(runs)])
    assert [(r.pretrain, r.budget) for r in found if r.script == "dtql"] == [(4, 14)]  # pretraining counts in the budget
    assert [(r.script, r.seed) for r in found] == [("sdac", 1), ("sdac", 2), ("dtql", 1)]
    hopper = [r for r in found if r.task == "Hopper-v5"]
    assert sorted(r.steps for r in hopper) == [20, 30]
    steps, mean, std = report.curve_stats(hopper)  # the steps both seeds reached
    assert steps.tolist() == [10, 20] and mean.tolist() == [1.5, 4.0] and std.tolist() == [0.5, 1.0]

    monkeypatch.setattr(sys, "argv", ["report.py", "--runs", str(runs)])
    text = report.main(report.Args(runs=[str(runs)], out=str(tmp_path / "out"), title="T"))
    row = next(line for line in text.splitlines() if "| Hopper-v5 | sdac" in line)
    # final 3 and 4 -> 3.5 ± 0.5; best 3 and 5 -> 4.0 ± 1.0; SPS mean 200
    assert row == "| Hopper-v5 | sdac | 2 (1, 2) | 20-30 env | 3.5 ± 0.5 | 4.0 ± 1.0 | return | 200 |"
    row = next(line for line in text.splitlines() if "umaze" in line)
    assert "10 grad" in row and "20.0 ± 0.0" in row and "normalized score" in row
    assert "Hopper-v5:\n\n| run | 10 | 20 | 30 |" in text  # every run's evaluations, blank where a seed stopped
    assert "| sdac, seed 1 | 1.0 | 3.0 |  |" in text and "| sdac, seed 2 | 2.0 | 5.0 | 4.0 |" in text
    assert "| dtql, seed 1 | 10.0 | 20.0 |" in text  # the normalized score (10 x return here)
    assert [report.step_label(s) for s in (5000, 55_000, 1_000_000, 1_050_000, 1234)] == ["5k", "55k", "1M", "1.05M", "1,234"]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.md", "Hopper-v5.png",
                                                              "regen_pointmaze_umaze-v2.png"}
    assert str(tmp_path) not in text  # results name no machine paths
    with pytest.raises(SystemExit, match="no run"):
        report.main(report.Args(runs=[str(tmp_path / "empty")], out=str(tmp_path / "out2")))
