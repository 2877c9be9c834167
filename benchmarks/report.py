"""Aggregates runs of the five scripts: a markdown table over seeds and one learning-curve PNG per task.

Reads each run's summary.json (flags, final/best evaluation, SPS, steps done) and its TensorBoard evaluation scalars
(`eval/normalized_score` where the dataset has reference scores, else `eval/episodic_return`). Runs are grouped by
(exp_name, task) and aggregated over seeds (a seed run twice counts once: the run that got furthest).

    python benchmarks/report.py --runs results_dacer/runs --out benchmarks/results/dacer --title "DACER, 1M env steps"

writes <out>/report.md (the table over seeds, every run's evaluations, the command, the machine) and <out>/<task>.png
(mean over seeds, shaded +- std; x: env steps for the online scripts, gradient steps for the offline ones).
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Args:
    runs: list[str] = field(default_factory=lambda: ["runs"])
    """run directories, or folders searched recursively for runs (any folder holding a summary.json)"""
    out: str = "report"
    """output folder for report.md and the PNGs"""
    title: str = "Results"
    """heading of report.md"""


@dataclass
class RunData:
    path: Path
    script: str  # exp_name
    task: str  # env id or dataset id
    seed: int
    offline: bool
    steps: int  # env steps (online) or gradient steps (offline) done
    budget: int  # the run's total, pretraining included (dtql)
    pretrain: int  # gradient steps of pretraining before the first evaluation (dtql), else 0
    final: float | None
    best: float | None
    sps: float | None
    metric: str  # "normalized score" or "return"
    curve: list[tuple[int, float]]  # (step, value) of the evaluations, in the metric above


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """[(step, value)] of one scalar tag in the run's event files; on a resumed run the latest value per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    by_step = {}
    for event in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
        by_step[event.step] = event.value
    return sorted(by_step.items())


def load_run(run_dir: Path) -> RunData | None:
    """A run's data, or None where it has no summary yet."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    args = summary["args"]
    offline = "dataset_id" in args
    curve = tensorboard_scalars(run_dir, "eval/normalized_score")
    metric = "normalized score"
    final, best = summary.get("last_normalized_score"), summary.get("best_normalized_score")
    if not curve or final is None:
        curve, metric = tensorboard_scalars(run_dir, "eval/episodic_return"), "return"
        final, best = summary.get("final_eval_return"), summary.get("best_eval_return")
    if not curve:  # no TensorBoard evaluations (e.g. the events were removed): the summary's own history
        key = "normalized_score" if metric == "normalized score" else "mean_return"
        curve = [(e["step"], e[key]) for e in summary.get("eval", []) if e.get(key) is not None]
    return RunData(path=run_dir, script=args.get("exp_name", "?"), task=args.get("dataset_id") or args.get("env_id", "?"),
                   seed=int(args.get("seed", 0)), offline=offline, steps=int(summary.get("global_step", 0)),
                   budget=int(args.get("total_timesteps") or 0) + int(args.get("pretrain_steps") or 0),
                   pretrain=int(args.get("pretrain_steps") or 0),
                   final=final, best=best, sps=summary.get("sps"), metric=metric, curve=curve)


def find_runs(paths: list[str]) -> list[RunData]:
    dirs = []
    for p in map(Path, paths):
        dirs += [p] if (p / "summary.json").is_file() else sorted(s.parent for s in p.rglob("summary.json"))
    runs = [r for r in map(load_run, dirs) if r is not None]
    latest: dict[tuple[str, str, int], RunData] = {}  # a seed run twice: keep the one that got furthest
    for r in runs:
        key = (r.script, r.task, r.seed)
        if key not in latest or r.steps > latest[key].steps:
            latest[key] = r
    return sorted(latest.values(), key=lambda r: (r.task, r.script, r.seed))


def group(runs: list[RunData]) -> dict[tuple[str, str], list[RunData]]:
    groups: dict[tuple[str, str], list[RunData]] = {}
    for r in runs:
        groups.setdefault((r.task, r.script), []).append(r)
    return groups


def mean_std(values: list[float | None]) -> str:
    xs = np.array([v for v in values if v is not None], dtype=np.float64)
    return "n/a" if xs.size == 0 else f"{xs.mean():.1f} ± {xs.std():.1f}"


def curve_stats(runs: list[RunData]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluation steps that every seed reached, and the mean and std over seeds there."""
    common = sorted(set.intersection(*(set(s for s, _ in r.curve) for r in runs)))
    values = np.array([[dict(r.curve)[s] for s in common] for r in runs], dtype=np.float64).reshape(len(runs), len(common))
    return np.array(common), values.mean(0), values.std(0)


def table(groups: dict[tuple[str, str], list[RunData]]) -> str:
    lines = ["| task | script | seeds | steps done | final eval | best eval | metric | SPS |",
             "|---|---|---|---|---|---|---|---|"]
    for (task, script), runs in groups.items():
        unit = "grad" if runs[0].offline else "env"
        steps = f"{min(r.steps for r in runs):,}" + ("" if len({r.steps for r in runs}) == 1 else f"-{max(r.steps for r in runs):,}")
        sps = [r.sps for r in runs if r.sps is not None]
        metrics = {r.metric for r in runs}
        lines.append(f"| {task} | {script} | {len(runs)} ({', '.join(str(r.seed) for r in runs)}) | {steps} {unit} | "
                     f"{mean_std([r.final for r in runs])} | {mean_std([r.best for r in runs])} | "
                     f"{'/'.join(sorted(metrics))} | {np.mean(sps):.0f} |" if sps else
                     f"| {task} | {script} | {len(runs)} | {steps} {unit} | {mean_std([r.final for r in runs])} | "
                     f"{mean_std([r.best for r in runs])} | {'/'.join(sorted(metrics))} | n/a |")
    return "\n".join(lines)


def step_label(step: int) -> str:
    """5000 -> "5k", 1_050_000 -> "1.05M"; other counts in full."""
    if step >= 1_000_000 and step % 10_000 == 0:
        return f"{step / 1e6:g}M"
    return f"{step / 1e3:g}k" if step % 1000 == 0 else f"{step:,}"


def evaluations(task: str, groups: dict[str, list[RunData]]) -> str:
    """Every run's evaluation at each evaluation step of the task (rows: script and seed; blank where not reached)."""
    steps = sorted({s for runs in groups.values() for r in runs for s, _ in r.curve})
    lines = [f"{task}:", "", "| run | " + " | ".join(map(step_label, steps)) + " |", "|---|" + "---:|" * len(steps)]
    for script, runs in groups.items():
        for r in runs:
            values = dict(r.curve)
            lines.append(f"| {script}, seed {r.seed} | "
                         + " | ".join(f"{values[s]:.1f}" if s in values else "" for s in steps) + " |")
    return "\n".join(lines)


def plot_task(task: str, groups: dict[str, list[RunData]], path: Path) -> None:
    """One PNG for a task: per script the mean over seeds with a shaded +- std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    offline = any(r.offline for runs in groups.values() for r in runs)
    metrics = {r.metric for runs in groups.values() for r in runs}
    budgets = []
    for script, runs in groups.items():
        runs = [r for r in runs if r.curve]
        if not runs:
            continue
        steps, mean, std = curve_stats(runs)
        pretrain = max(r.pretrain for r in runs)
        label = f"{script} ({len(runs)} seed{'s' * (len(runs) > 1)}" + (f"; {pretrain:,} pretraining steps first)" if pretrain else ")")
        ax.plot(steps, mean, marker="o", markersize=3, label=label)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
        budgets.append(max(r.budget for r in runs))
    ax.set_xlabel("gradient steps" if offline else "env steps")
    ax.set_ylabel("eval " + "/".join(sorted(metrics)))
    budget = f"{' / '.join(f'{b:,}' for b in sorted(set(budgets)))} {'gradient' if offline else 'env'} steps" if budgets else ""
    ax.set_title(f"{', '.join(groups)} on {task}\nbudget {budget}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def short_path(arg: str) -> str:
    """Absolute paths are named by their last component only: results files name no machine paths."""
    return Path(arg).name if arg.startswith("/") else arg


def main(args: Args) -> str:
    runs = find_runs(args.runs)
    if not runs:
        sys.exit(f"report.py: error: no run with a summary.json under {', '.join(args.runs)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group(runs)
    by_task: dict[str, dict[str, list[RunData]]] = {}
    for (task, script), rs in groups.items():
        by_task.setdefault(task, {})[script] = rs
    images, evals = [], []
    for task, scripts in by_task.items():
        name = task.replace("/", "_") + ".png"
        plot_task(task, scripts, out / name)
        images.append(f"![{task}]({name})")
        evals.append(evaluations(task, scripts))
    sys.path.append(str(Path(__file__).resolve().parent / "parity"))  # last: its harnesses share the scripts' names
    from common import environment

    text = "\n\n".join([f"# {args.title}", table(groups), *images,
                        "Mean ± std over seeds of each run's final and best evaluation (normalized score where the "
                        "dataset has reference scores, else return). SPS: env steps (online) or gradient steps "
                        "(offline) per second of the whole run, evaluations included.",
                        "## Every evaluation\n\nEach run's evaluation (the metric above) at each step, in "
                        + ("gradient steps" if any(r.offline for r in runs) else "env steps")
                        + (", pretraining steps included" if any(r.pretrain for r in runs) else "") + ".", *evals,
                        f"Made with `python benchmarks/report.py {shlex.join(map(short_path, sys.argv[1:]))}`; "
                        f"{environment()}."])
    (out / "report.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
