"""Launches a grid of runs: scripts x env (or dataset) ids x seeds, the same extra flags for all, one run each.

Modelled on CleanRL's `cleanrl_utils/benchmark.py`. Two backends:
- local: a pool of at most `--workers` runs at once on this machine, each with OMP_NUM_THREADS=1;
- slurm: one submitit job array (partition, time, GPUs and CPUs per task as flags; `--slurm-cluster local|debug`
  runs the same submitted function through submitit's local or in-process executors, without a cluster).

Every run is `python <script> --env-id E | --dataset-id D --seed S --save-model <extra>` in `--runs-dir`, so it keeps
the script's own runs/{run_name}/ folder (TensorBoard events, summary.json, checkpoint.pt). Rerunning the same
launcher command skips finished runs and continues interrupted ones from their checkpoint (`--resume`).

    python benchmarks/benchmark.py --scripts dacer.py --env-ids Hopper-v5 HalfCheetah-v5 --num-seeds 2 --workers 2 \
        --extra="--total-timesteps 1000000" --runs-dir results_dacer
    python benchmarks/benchmark.py --scripts diffusion_ql.py dtql.py --env-ids regen/pointmaze/umaze-v2 \
        --backend slurm --slurm-partition gpu --slurm-time-min 600 --slurm-gpus 1 --slurm-cpus 4
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
OFFLINE_MARKER = "    dataset_id: str"  # an Args field only the offline scripts have: they take --dataset-id


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["dacer.py"])
    """scripts to run (paths relative to the repository root, or absolute)"""
    env_ids: list[str] = field(default_factory=lambda: ["Hopper-v5"])
    """ids of the tasks: gymnasium env ids for the online scripts, Minari dataset ids for the offline ones"""
    num_seeds: int = 3
    """number of seeds per (script, task)"""
    start_seed: int = 1
    """the first seed; the runs use start_seed, ..., start_seed + num_seeds - 1"""
    extra: str = ""
    """flags added to every run; give them with "=": --extra="--total-timesteps 50000 --eval-frequency 5000" """
    runs_dir: str = "."
    """working directory of the runs (their outputs go to runs_dir/runs/{run_name}; launcher logs to runs_dir/logs)"""
    save_model: bool = True
    """pass --save-model, so an interrupted run can be resumed by rerunning this command"""
    dry_run: bool = False
    """print the commands (with their resume/skip decision) and exit"""
    backend: Literal["local", "slurm"] = "local"
    """local worker pool, or a submitit job array"""
    workers: int = 1
    """local backend: runs at once"""
    slurm_cluster: Literal["slurm", "local", "debug"] = "slurm"
    """submitit executor: a real Slurm cluster, or submitit's local (subprocesses) / debug (in-process) executors"""
    slurm_partition: str | None = None
    """Slurm partition"""
    slurm_time_min: int = 24 * 60
    """Slurm time limit of each run, minutes"""
    slurm_gpus: int = 0
    """GPUs per run"""
    slurm_cpus: int = 1
    """CPUs per run (also its OMP_NUM_THREADS)"""
    slurm_array_parallelism: int = 64
    """most array tasks running at once"""
    wait: bool = True
    """slurm backend: wait for the jobs and print their exit codes"""


@dataclass(frozen=True)
class Run:
    """One (script, task, seed) of the grid: everything a worker needs, picklable for submitit."""

    script: str  # absolute path
    task: str
    seed: int
    extra: tuple[str, ...]
    runs_dir: str  # absolute path
    save_model: bool = True
    threads: int = 1

    @property
    def exp_name(self) -> str:
        """The run's --exp-name (the last one in `extra`, as tyro reads it), else the script's file stem."""
        return flag_value(self.extra, "--exp-name") or Path(self.script).stem

    @property
    def prefix(self) -> str:
        """The scripts' run_name without its timestamp: {task with / -> _}__{exp_name}__{seed}__"""
        return f"{self.task.replace('/', '_')}__{self.exp_name}__{self.seed}__"

    @property
    def offline(self) -> bool:
        return OFFLINE_MARKER in Path(self.script).read_text()


def expand(args: Args) -> list[Run]:
    """The grid, in CleanRL's order: for each script, each task, each seed."""
    runs_dir = str(Path(args.runs_dir).resolve())
    extra = tuple(shlex.split(args.extra))
    threads = args.slurm_cpus if args.backend == "slurm" else 1
    runs = []
    for script in args.scripts:
        path = Path(script) if Path(script).is_absolute() else REPO / script
        if not path.is_file():
            sys.exit(f"benchmark.py: error: no script {path}")
        for task in args.env_ids:
            for seed in range(args.start_seed, args.start_seed + args.num_seeds):
                runs.append(Run(str(path), task, seed, extra, runs_dir, args.save_model, threads))
    return runs


def flag_value(flags: tuple[str, ...], name: str) -> str | None:
    """The value of the last `name V` or `name=V` in flags (tyro keeps the last one), else None."""
    value = None
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


def is_finished(run_dir: Path, total_timesteps: int | None = None) -> bool:
    """The run's summary says it reached its budget: `total_timesteps` if given (a rerun asking for more steps
    resumes the run), else its own; dtql's global step counts its pretraining steps too."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    budget = total_timesteps if total_timesteps is not None else summary["args"].get("total_timesteps") or 0
    return summary.get("global_step", 0) >= budget + (summary["args"].get("pretrain_steps") or 0)


def existing_run(run: Run) -> Path | None:
    """The newest runs/{run_name} of this (script, task, seed), if any."""
    root = Path(run.runs_dir) / "runs"
    found = [d for d in root.glob(run.prefix + "*") if d.is_dir()] if root.is_dir() else []
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


def plan(run: Run) -> tuple[str, list[str]]:
    """("skip" | "resume" | "start", command). Resume passes only --resume and the extra flags: the checkpoint holds
    the task, seed and the rest, and flags given with --resume override the saved ones."""
    prior = existing_run(run)
    budget = flag_value(run.extra, "--total-timesteps")
    if prior is not None and is_finished(prior, int(budget) if budget and budget != "None" else None):
        return "skip", []
    save = ["--save-model"] if run.save_model else []
    if prior is not None and (prior / "checkpoint.pt").is_file():
        return "resume", [sys.executable, run.script, "--resume", str(prior / "checkpoint.pt"), *save, *run.extra]
    id_flag = "--dataset-id" if run.offline else "--env-id"
    return "start", [sys.executable, run.script, id_flag, run.task, "--seed", str(run.seed), *save, *run.extra]


def say(line: str) -> None:
    """One whole line per write, so lines of concurrent workers do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def execute(run: Run) -> int:
    """Runs one grid cell to the end (skips it if finished, resumes it if it has a checkpoint); returns the exit code.
    This is also the function submitit submits, so it needs nothing but its argument."""
    action, command = plan(run)
    log_dir = Path(run.runs_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{run.prefix.rstrip('_')}.log"
    if action == "skip":
        say(f"skip   {run.prefix.rstrip('_')}: finished")
        return 0
    say(f"{action:<6} {run.prefix.rstrip('_')}: {shlex.join(command)} > {log}")
    threads = str(run.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        return subprocess.run(command, cwd=run.runs_dir, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def run_local(runs: list[Run], workers: int) -> list[int]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(execute, runs))


def make_executor(args: Args):
    """A submitit executor for the job array; logs under runs_dir/logs/submitit."""
    import submitit

    if __name__ != "__main__":  # imported (tests, other tools): ship `execute` by value, not by module reference
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    folder = Path(args.runs_dir).resolve() / "logs" / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=None if args.slurm_cluster == "slurm" else args.slurm_cluster)
    params = {"timeout_min": args.slurm_time_min, "cpus_per_task": args.slurm_cpus, "name": "diffusion-rl-benchmark",
              "slurm_array_parallelism": args.slurm_array_parallelism}
    if args.slurm_gpus:
        params["gpus_per_node"] = args.slurm_gpus
    if args.slurm_partition:
        params["slurm_partition"] = args.slurm_partition
    executor.update_parameters(**params)
    return executor


def run_slurm(runs: list[Run], args: Args) -> list[int] | list:
    executor = make_executor(args)
    jobs = executor.map_array(execute, runs)
    for run, job in zip(runs, jobs):
        print(f"submitted {run.prefix.rstrip('_')}: job {job.job_id}", flush=True)
    return [job.result() for job in jobs] if args.wait else jobs


def main(args: Args) -> list[int] | list:
    runs = expand(args)
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        for run in runs:
            action, command = plan(run)
            print(f"{action:<6} {run.prefix.rstrip('_')}" + (f": {shlex.join(command)}" if command else ""))
        return []
    codes = run_local(runs, args.workers) if args.backend == "local" else run_slurm(runs, args)
    if codes and all(isinstance(c, int) for c in codes):
        failed = [r.prefix.rstrip("_") for r, c in zip(runs, codes) if c != 0]
        print(f"{len(runs) - len(failed)}/{len(runs)} runs exited 0" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return codes


if __name__ == "__main__":
    import tyro

    codes = main(tyro.cli(Args))
    sys.exit(1 if any(isinstance(c, int) and c != 0 for c in codes) else 0)
