"""Steady-state training speed of the five scripts on this machine's CPU, at default network sizes.

Each script runs briefly as a subprocess, exactly as a user would start it, on a small task:
- online (sdac, dacer, qvpo): the script's default env with a short `--learning-starts`, then a fixed number of
  training steps; the rate is env steps/s;
- offline (diffusion_ql, dtql): a small synthetic Hopper-v5 Minari dataset built with `tests/offline_data.py` in a
  temporary directory (step time does not depend on the data), the hopper-medium-v2 preset; the rate is gradient
  steps/s (dtql: main-loop steps, `--pretrain-steps 0`).
Every status line that starts with `step N` is timestamped as it arrives; the rate is
(last step - first counted step) / (time between those two lines), where the first counted line is the one that ends
the first window after warm-up (so start-up, the random warm-up, compilation and one-off first-update costs are
excluded). The run is stopped after its last status line, before the final evaluation. Evaluation is never timed.

    OMP_NUM_THREADS=1 python benchmarks/cpu_sps.py                     # all five, writes benchmarks/results/cpu-sps-<date>.md
    OMP_NUM_THREADS=1 python benchmarks/cpu_sps.py --scripts sdac dtql # a subset
    python benchmarks/cpu_sps.py --quick --out /some/file.md           # plumbing check: tiny nets and budgets

The results file names the date, CPU, versions, thread count and the load average before and after each run (the
rate of a busy machine is lower; compare rates only within one file).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.append(os.path.join(HERE, "parity"))  # last: its harnesses share the scripts' names
from common import environment  # noqa: E402  (benchmarks/parity/common.py)

STEP_LINE = re.compile(r"^\s*step\s+([\d,]+)\b")
NEVER = str(10**9)  # an eval frequency no short run reaches


@dataclasses.dataclass
class Spec:
    """One measured configuration: the command-line flags, the unit and which status lines count."""

    name: str  # row label
    script: str  # file name in the repository root
    args: list[str]
    unit: str  # "env steps/s" or "gradient steps/s"
    count_from: int  # first status-line step counted (the end of the first window after warm-up)
    stop_at: int  # stop the run at the first status line with step >= this
    offline: bool = False


OFFLINE_COMMON = ["--dataset-id", "test/hopper/random-v0", "--preset", "hopper-medium-v2", "--batch-size", "256",
                  "--eval-frequency", NEVER, "--eval-episodes", "1"]


def specs(quick: bool) -> list[Spec]:
    """The measured configurations; `quick` shrinks step counts and networks so the plumbing runs in seconds."""
    out = [
        Spec("sdac", "sdac.py", ["--env-id", "Ant-v5", "--learning-starts", "1000", "--total-timesteps", "1200",
                                 "--log-frequency", "25", "--eval-frequency", NEVER, "--eval-episodes", "1"],
             "env steps/s", count_from=1025, stop_at=1200),
        Spec("dacer", "dacer.py", ["--env-id", "HalfCheetah-v5", "--learning-starts", "2000", "--total-timesteps", "6000",
                                   "--log-frequency", "500", "--eval-frequency", NEVER, "--eval-episodes", "1"],
             "env steps/s", count_from=2500, stop_at=6000),
        Spec("qvpo", "qvpo.py", ["--env-id", "Hopper-v5", "--learning-starts", "300", "--total-timesteps", "308",
                                 "--log-frequency", "1", "--eval-frequency", NEVER, "--eval-episodes", "1"],
             "env steps/s", count_from=301, stop_at=308),
    ]
    for compiled in (True, False):
        flag = [] if compiled else ["--no-compile"]
        tag = "" if compiled else " --no-compile"
        out += [
            Spec("diffusion_ql" + tag, "diffusion_ql.py", OFFLINE_COMMON + ["--total-timesteps", "300", "--log-frequency",
                 "50", "--eval-candidates", "1"] + flag, "gradient steps/s", count_from=50, stop_at=300, offline=True),
            Spec("dtql" + tag, "dtql.py", OFFLINE_COMMON + ["--total-timesteps", "300", "--log-frequency", "50",
                 "--pretrain-steps", "0", "--eval-deterministic"] + flag, "gradient steps/s", count_from=50,
                 stop_at=300, offline=True),
        ]
    if not quick:
        return out
    # Tiny networks and a handful of steps: checks the plumbing (launch, parse, stop, report), not the speed.
    tiny = {
        "sdac": (["--learning-starts", "50", "--total-timesteps", "80", "--log-frequency", "10", "--hidden-dim", "16",
                  "--num-particles", "2", "--num-reverse-samples", "2", "--diffusion-steps", "2",
                  "--max-episode-steps", "20"], 60, 80),
        "dacer": (["--learning-starts", "40", "--total-timesteps", "100", "--log-frequency", "20", "--num-envs", "2",
                   "--hidden-dim", "16", "--entropy-samples", "8", "--em-iterations", "2", "--diffusion-steps", "2",
                   "--max-episode-steps", "20"], 60, 100),
        "qvpo": (["--learning-starts", "20", "--total-timesteps", "26", "--log-frequency", "2", "--hidden-dim", "16",
                  "--train-samples", "2", "--diffusion-steps", "2", "--max-episode-steps", "20"], 22, 26),
    }
    quick_specs = []
    for spec in out:
        if spec.offline and "--no-compile" not in spec.args:
            continue  # compiling is most of a tiny run; the eager rows exercise the same plumbing
        if spec.name in tiny:
            extra, count_from, stop_at = tiny[spec.name]
        else:
            extra, count_from, stop_at = ["--total-timesteps", "12", "--log-frequency", "3", "--hidden-dim", "16"], 3, 12
        quick_specs.append(dataclasses.replace(spec, args=override(spec.args, extra), count_from=count_from,
                                               stop_at=stop_at))
    return quick_specs


def override(args: list[str], extra: list[str]) -> list[str]:
    """`args` with each `--flag value` pair of `extra` replacing that flag's value (or appended when absent)."""
    args = list(args)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def steady_rate(points: list[tuple[float, int]], count_from: int) -> tuple[float, list[float]]:
    """points: (wall seconds, step) of the status lines in order -> (overall rate, per-window rates) from count_from.

    The overall rate is (last step - first counted step) / elapsed time between those two lines; NaN when fewer than
    two lines are counted.
    """
    counted = [(t, s) for t, s in points if s >= count_from]
    if len(counted) < 2 or counted[-1][0] <= counted[0][0]:
        return float("nan"), []
    windows = [(s1 - s0) / (t1 - t0) for (t0, s0), (t1, s1) in zip(counted, counted[1:]) if t1 > t0 and s1 > s0]
    return (counted[-1][1] - counted[0][1]) / (counted[-1][0] - counted[0][0]), windows


def run_one(argv: list[str], stop_at: int, cwd: str, env: dict[str, str], timeout: float) -> tuple[list[tuple[float, int]], str]:
    """Run `argv`, timestamp its `step N` status lines; stop it at the first line with step >= stop_at.

    Returns the (seconds since launch, step) points and how the run ended ("stopped", "exited N", "timed out").
    """
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines: queue.Queue = queue.Queue()  # a reader thread, so that a silent child cannot outlast the timeout

    def reader() -> None:
        for line in proc.stdout:
            lines.put((time.perf_counter() - start, line))
        lines.put((time.perf_counter() - start, None))  # end of output

    threading.Thread(target=reader, daemon=True).start()
    points, ending, tail = [], None, []
    try:
        while True:
            try:
                now, line = lines.get(timeout=max(0.0, timeout - (time.perf_counter() - start)))
            except queue.Empty:
                ending = "timed out"
                break
            if line is None:
                break
            tail = (tail + [line.rstrip()])[-20:]
            match = STEP_LINE.match(line)
            if match:
                points.append((now, int(match.group(1).replace(",", ""))))
                if points[-1][1] >= stop_at:
                    ending = "stopped"
                    break
    finally:
        if proc.poll() is None:
            proc.terminate()  # before the final evaluation: it is not part of the training rate
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if ending is None:
        proc.wait()
        ending = f"exited {proc.returncode}"
        if proc.returncode != 0:
            sys.stderr.write(f"{argv[1]} exited {proc.returncode}:\n" + "\n".join(tail) + "\n")
    return points, ending


def make_dataset(root: str) -> None:
    """Build the synthetic Hopper-v5 dataset of the tests under the Minari root `root` (no download)."""
    os.environ["MINARI_DATASETS_PATH"] = root
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import offline_data  # tests/offline_data.py

    offline_data.make_mujoco_dataset()  # 6 short random-policy episodes; step time does not depend on the data


def versions() -> str:
    parts = []
    for module in ("gymnasium", "mujoco", "minari"):
        try:
            parts.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scripts", nargs="+", default=None,
                        help="which rows to run: sdac dacer qvpo diffusion_ql dtql (offline ones run compiled and "
                             "--no-compile); default all")
    parser.add_argument("--quick", action="store_true", help="tiny nets and budgets: checks the plumbing only")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/cpu-sps-<date>.md)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run before it is stopped")
    opts = parser.parse_args(argv)

    import torch  # noqa: F401  (so that environment() names its version)

    chosen = [s for s in specs(opts.quick) if opts.scripts is None or s.name.split()[0] in opts.scripts]
    if not chosen:
        parser.error(f"no rows match {opts.scripts}")
    today = datetime.date.today().isoformat()
    out = opts.out or os.path.join(HERE, "results", f"cpu-sps-{today}.md")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MINARI_DATASETS_PATH": os.path.join(scratch, "minari")}
        if any(s.offline for s in chosen):
            make_dataset(env["MINARI_DATASETS_PATH"])
        for spec in chosen:
            flags = spec.args
            load_before = os.getloadavg()[0]
            points, ending = run_one([sys.executable, os.path.join(REPO, spec.script), *flags], spec.stop_at,
                                     cwd=scratch, env=env, timeout=opts.timeout)
            load_after = os.getloadavg()[0]
            rate, windows = steady_rate(points, spec.count_from)
            counted = [s for _, s in points if s >= spec.count_from]
            span = f"{counted[0]:,}-{counted[-1]:,}" if len(counted) >= 2 else "-"
            spread = f"{min(windows):.3g}-{max(windows):.3g}" if windows else "-"
            results[spec.name] = rate
            print(f"{spec.name:26s} {rate:10.3g} {spec.unit} (steps {span}, windows {spread}, {ending}, "
                  f"load {load_before:.1f}->{load_after:.1f})", flush=True)
            rows.append(f"| `{spec.name}` | {rate:.3g} {spec.unit} | {1e3 / rate if rate > 0 else float('nan'):.4g} ms "
                        f"| {span} | {spread} | {load_before:.1f} / {load_after:.1f} | {ending} "
                        f"| `python {spec.script} {' '.join(flags)}` |")

    lines = [f"# CPU training speed, {today}", "",
             f"Command: `OMP_NUM_THREADS={threads} python benchmarks/cpu_sps.py"
             + (f" --scripts {' '.join(opts.scripts)}" if opts.scripts else "") + (" --quick" if opts.quick else "")
             + "`" + (" (plumbing check: tiny networks, not a speed measurement)" if opts.quick else ""), "",
             f"Machine and software: {environment()}; {versions()}; {os.cpu_count()} CPUs; OMP_NUM_THREADS={threads}.",
             "", "Rate = status-line steps / wall time between the first line after the first post-warm-up window and "
             "the last line (evaluation, start-up, warm-up and compilation excluded). Online rows are env steps/s "
             "(sdac: 5 envs per update, dacer: 20, qvpo: 1), offline rows gradient steps/s (dtql: main-loop steps). "
             "The time per step is 1/rate. Load = 1-minute load average before / after the run: on a machine shared "
             "with other jobs the rates are lower than on an idle one.", "",
             "| script | rate | per step | steps counted | per-window rates | load | run | command |",
             "|---|---:|---:|---:|---:|---:|---|---|", *rows]
    ratios = []
    for tag in ("", " --no-compile"):
        dql, dtql = results.get("diffusion_ql" + tag), results.get("dtql" + tag)
        if dql and dtql and dql == dql and dtql == dtql:  # both measured and not NaN
            ratios.append(f"| {'compiled (default)' if not tag else '--no-compile'} | {1e3 / dtql:.4g} | "
                          f"{1e3 / dql:.4g} | {dtql / dql:.2f}x |")
    if ratios:
        lines += ["", "DTQL vs Diffusion-QL, ms per gradient step (same dataset, batch 256, Hopper shapes; DTQL "
                  "speed-up = Diffusion-QL time / DTQL time):", "",
                  "| losses | dtql.py ms/step | diffusion_ql.py ms/step | DTQL speed-up |", "|---|---:|---:|---:|",
                  *ratios]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0 if all(r == r and r > 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
