"""The one command to run on a GPU machine: does the fused chain compile cleanly, compute correctly, and beat the
scripts' PyTorch loop, at the scripts' real call shapes?

    python -m kernels.gpu_check                 # about 5-8 minutes on an H100/H200; needs only torch and triton
    python -m kernels.gpu_check --dry           # CPU: the same plumbing through Triton's interpreter, tiny shapes

Per variant (precision tf32 / bf16 x hidden 256 / 512 x the call shapes of kernels.bench.SHAPES) one markdown row:
  compile s     first launch of the fused kernel(s) with an empty Triton cache (forward; + backward for "train")
  regs/spill    registers per thread and spilled bytes of the compiled kernel(s), fwd[;bwd]
  err fused     max |out - ref| (and for "train" the relative L2 error of all denoiser gradients) of the fused kernel,
                ref = the fp64 chain of the same rounded weights and inputs
  err loop      the same for the scripts' PyTorch loop in the same precision (the yardstick: fused should be <= ~2x)
  fused/loop/compile+graph us   wall time per call with a synchronize after each (median), what a script pays;
                compile+graph (torch.compile(mode="reduce-overhead") of the loop) only for the H 256 tf32 cases of
                kernels.bench.QUICK, and only while the time budget lasts
  speed-up      loop / fused wall time
The speed-up column is what `kernels/measured.py` records (by hand) to let `--kernels auto` pick the fused chain.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if "--dry" not in sys.argv[1:]:
    # A cold cache, so that "compile s" is the real compile time, unless the caller chose a cache.
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_gpu_check_"))

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import bench, chain  # noqa: E402


def kernel_stats(case: dict, precision: str, train: bool) -> tuple[str, str]:
    """Launches the fused kernel(s) once through the wrapper's own launch helpers and reads what Triton compiled:
    -> ("compile s", "regs/spill fwd[; bwd]"). Under the interpreter there is no compiled kernel ("n/a")."""
    name, cdtype, prec = chain._resolve_precision(precision, torch.float32)
    state, x, temb, noise = case["inputs"]
    args, coef = chain._prepare(case["layers"], cdtype, state, x, temb, case["betas"], case["order"], False)
    p = chain._Problem(*(t.detach() for t in args), coef, noise, None, 1.0, False, prec, training=train)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t0 = time.perf_counter()
    grid, a, kw, out, ws = chain._forward_launch(p, train)
    kernels_run = [chain._chain_fwd_kernel[grid](*a, **kw)]
    if train:
        wsx, wsz = ws
        grid, a, kw, _ = chain._backward_launch(p, torch.ones_like(out), wsx, wsz)
        kernels_run.append(chain._chain_bwd_kernel[grid](*a, **kw))
    sync()
    secs = time.perf_counter() - t0
    if any(k is None or not hasattr(k, "n_regs") for k in kernels_run):
        return "n/a (interpreter)", "n/a"
    return f"{secs:.1f}", "; ".join(f"{k.n_regs}/{k.n_spills}" for k in kernels_run)


def run(precisions, hiddens, shapes, budget_s: float, device, reps: int, compile_graph: bool) -> list[list[str]]:
    t_start = time.perf_counter()
    rows = []
    for precision in precisions:
        for H in hiddens:
            for script, T, N, pass_ in shapes:
                train = pass_ == "train"
                torch._dynamo.reset()
                case = bench.make_case(script, T, N, H, precision, device)
                ref = bench.reference(case, train, device=device)
                row = [precision, str(H), script, str(T), str(N), pass_]
                try:
                    comp, regs = kernel_stats(case, precision, train)
                except Exception as e:  # noqa: BLE001 - a failing variant is a row
                    comp, regs = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}", ""
                want_cg = (compile_graph and device.type == "cuda" and H == 256 and precision == "tf32"
                           and (script, T, N, pass_) in bench.QUICK
                           and time.perf_counter() - t_start < 0.6 * budget_s)
                impls = bench.implementations(case, precision, train, device, with_compile=want_cg)
                res, wall = {}, {}
                for name, fn in impls.items():
                    try:
                        res[name] = fn()
                        wall[name] = bench.time_wall(fn, reps) if device.type == "cuda" else None
                    except Exception as e:  # noqa: BLE001
                        res[name], wall[name] = None, f"failed: {type(e).__name__}"

                def err(name):
                    return bench.errors(res[name], ref) if res.get(name) is not None else "failed"

                def us(name):
                    v = wall.get(name, "-")
                    return f"{v:,.1f}" if isinstance(v, float) else ("n/a" if v is None else v)

                speed = (f"{wall['loop'] / wall['fused']:.2f}x" if isinstance(wall.get("loop"), float)
                         and isinstance(wall.get("fused"), float) else "n/a")
                rows.append(row + [comp, regs, err("fused"), err("loop"), us("fused"), us("loop"),
                                   us("compile+graph"), speed])
                print("| " + " | ".join(rows[-1]) + " |", flush=True)
                if time.perf_counter() - t_start > budget_s:
                    print(f"# time budget of {budget_s:.0f} s spent: remaining variants skipped", flush=True)
                    return rows
    return rows


COLS = ["precision", "H", "script", "T", "N", "pass", "compile s", "regs/spill", "err fused (out / grad rel)",
        "err loop", "fused us", "loop us", "compile+graph us", "speed-up vs loop"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU plumbing run through the interpreter (tiny shapes, ieee)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later variants are skipped past it")
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--precision", nargs="+", default=["tf32", "bf16"], choices=("ieee", "tf32", "bf16"))
    ap.add_argument("--no-compile-graph", action="store_true", help="leave out the torch.compile + CUDA graph column")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dry:
        shapes, hiddens, precisions, reps = [("sdac", 3, 5, "sample"), ("diffusion_ql", 2, 7, "train")], [32], \
            ["ieee", "tf32"], 1
    else:
        if device.type != "cuda":
            print("kernels.gpu_check: error: no CUDA GPU (use --dry for the CPU plumbing run)", file=sys.stderr)
            return 2
        shapes, hiddens, precisions, reps = bench.SHAPES, args.hidden, args.precision, 20
    print(f"# kernels.gpu_check{' --dry' if args.dry else ''}: reverse chain, S={bench.S} A={bench.A} "
          f"temb={bench.E}; {bench.environment(device)}")
    print("| " + " | ".join(COLS) + " |")
    print("|" + "|".join("---" for _ in COLS) + "|", flush=True)
    rows = run(precisions, hiddens, shapes, args.budget, device, reps, not args.no_compile_graph)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
