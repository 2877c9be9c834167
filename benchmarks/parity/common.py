"""Shared plumbing of the parity harnesses: locate the official checkout, compare tensors, time both sides.

Every harness in this folder builds the official implementation and the script's from identical state, feeds both the
same batches and random draws, and records each compared quantity here. The report is one markdown table:
quantity -> max |ours - official| and max |ours - official| / max |official| over all compared updates.
"""

import datetime
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

TOLERANCE = 1e-5  # max |ours - official| / max |official| per tensor, fp32
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(name: str):
    """Import one of the five scripts (e.g. "sdac") from the repository root under the module name `ours_<name>`.

    A harness file has the same name as its script, so a plain `import sdac` would import the harness itself.
    """
    spec = importlib.util.spec_from_file_location(f"ours_{name}", os.path.join(REPO_ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def require_official(path: str | None, url: str, commit: str) -> str:
    """Return the absolute path of an official checkout, or print how to get one and exit 1."""
    if path and os.path.isdir(path):
        head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        if head and not head.startswith(commit):
            print(f"warning: {path} is at {head[:7]}, the pinned commit is {commit}", file=sys.stderr)
        return os.path.abspath(path)
    name = url.rstrip("/").split("/")[-1]
    print(f"error: official checkout not found at {path!r}; get it with:\n"
          f"  git clone {url} {name}\n  git -C {name} checkout {commit}\n"
          f"then pass --official {name}", file=sys.stderr)
    sys.exit(1)


def draw_shape(args: tuple, kwargs: dict) -> tuple:
    """The shape a patched torch RNG call asks for: randn(2, 3), randn((2, 3)) or randn(size=(2, 3))."""
    if "size" in kwargs:
        return tuple(kwargs["size"])
    if len(args) == 1 and isinstance(args[0], (tuple, list)):  # torch.Size is a tuple
        return tuple(args[0])
    return tuple(args)


def to_numpy(x) -> np.ndarray:
    """torch tensors, jax/numpy arrays and Python numbers -> float64 numpy arrays."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


class Comparison:
    """Collects max abs / max rel differences per named quantity across updates."""

    def __init__(self, tolerance: float = TOLERANCE):
        self.tolerance = tolerance
        self.rows: dict[str, list[float]] = {}  # name -> [max abs, max rel, count]
        self.notes: dict[str, str] = {}

    def add(self, name: str, ours, official, note: str = "") -> float:
        """Compare one quantity (any shape); returns its relative difference."""
        a, b = to_numpy(ours), to_numpy(official)
        if a.shape != b.shape:
            if a.size == b.size:  # same values, different layout (e.g. [B] vs [B, 1]): compare flat
                a, b = a.reshape(-1), b.reshape(-1)
            else:
                raise ValueError(f"{name}: shape {a.shape} (ours) vs {b.shape} (official)")
        diff = np.abs(a - b)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(b).max()) if b.size else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):  # a NaN or inf on either side is a mismatch
            max_abs = max_rel = float("inf")
        row = self.rows.setdefault(name, [0.0, 0.0, 0])
        row[0], row[1], row[2] = max(row[0], max_abs), max(row[1], max_rel), row[2] + 1
        if note:
            self.notes[name] = note
        return max_rel

    def add_tree(self, prefix: str, ours: dict, official: dict) -> None:
        """Compare two dicts with the same keys (e.g. per-parameter gradients)."""
        if set(ours) != set(official):
            raise ValueError(f"{prefix}: keys differ: {sorted(set(ours) ^ set(official))}")
        for key in ours:
            self.add(f"{prefix}.{key}", ours[key], official[key])

    def failures(self) -> list[str]:
        return [name for name, (_, rel, _) in self.rows.items() if not rel <= self.tolerance]

    def table(self) -> str:
        lines = ["| quantity | compared | max abs diff | max rel diff | within 1e-5 |", "|---|---:|---:|---:|:-:|"]
        for name, (abs_, rel, count) in self.rows.items():
            ok = "yes" if rel <= self.tolerance else "**no**"
            note = f" ({self.notes[name]})" if name in self.notes else ""
            lines.append(f"| {name}{note} | {count} | {abs_:.3g} | {rel:.3g} | {ok} |")
        return "\n".join(lines)

    def report(self, title: str) -> int:
        """Print the table and a verdict; return the exit code (0 = every quantity within tolerance)."""
        print(f"## {title}\n\n{environment()}\n\n{self.table()}\n")
        bad = self.failures()
        if not self.rows:
            print("MISMATCH: nothing was compared")
            return 1
        print(f"MISMATCH in {len(bad)} quantities: {', '.join(bad)}" if bad else
              f"OK: {len(self.rows)} quantities within max rel diff {self.tolerance:g}")
        return 1 if bad else 0


def environment() -> str:
    """One line naming date, CPU, Python and library versions, for results files."""
    parts = [f"date {datetime.date.today().isoformat()}", f"python {platform.python_version()}"]
    for module in ("torch", "jax", "numpy"):
        if module in sys.modules:
            parts.append(f"{module} {sys.modules[module].__version__}")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "; ".join(parts + [f"CPU {cpu}"])


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 7, calls: int = 10,
                     sync: Callable[[object], object] = lambda out: out) -> dict[str, tuple[float, float, float]]:
    """Milliseconds per call of each function, measured in interleaved rounds so that machine noise hits all alike.

    Returns name -> (median, min, max) over rounds. `sync` blocks on a call's output (e.g. jax's block_until_ready).
    """
    for fn in fns.values():  # warm-up: compilation, allocator, caches
        sync(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fn()
            sync(out)
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def speed_table(results: dict[str, tuple[float, float, float]], baseline: str) -> str:
    """Markdown table of `time_interleaved` results with each row's speed-up over `baseline`."""
    lines = ["| implementation | ms per update (median) | range | speed-up vs " + baseline + " |", "|---|---:|---:|---:|"]
    base = results[baseline][0]
    for name, (median, lo, hi) in results.items():
        lines.append(f"| {name} | {median:.2f} | {lo:.2f}-{hi:.2f} | {base / median:.2f}x |")
    return "\n".join(lines)
