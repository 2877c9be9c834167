"""Benchmark of the reverse diffusion chain: the scripts' own PyTorch loop, that loop under torch.compile + CUDA graphs,
and the fused Triton kernel, with a correctness column.

    python -m kernels.bench                        # H 256 and 512 x precision tf32, bf16 x the scripts' call shapes
    python -m kernels.bench --quick                # 6 cases, H 256 (about 3 minutes on one GPU, see kernels/README.md)
    python -m kernels.bench --tiny                 # seconds on a CPU: the plumbing only (what the tests run)

One markdown table. Per case (pass, T, N, H, precision) and implementation:
  gpu us   median time per call on the GPU stream, calls queued back to back (CUDA events, triton do_bench);
  wall us  median wall time per call with a torch.cuda.synchronize() after each call (what a training loop that
           reads the result right away pays, CPU launch overhead included);
  err      max |out - ref| over the [N, A] output, ref = the fp64 chain of the same (rounded) weights and inputs;
           for "train" also the relative L2 error of the gradient of all denoiser weights and biases.
Implementations: "loop" = the scripts' PyTorch chain (`torch_chain`, the `backend="torch"` branch of the scripts'
`reverse_chain`: state and time projections of layer 1 hoisted out of the step loop); "compile+graph" =
torch.compile(mode="reduce-overhead") of that loop (compiled code replayed through CUDA graphs), with
torch._dynamo.reset() before every case; "fused" = kernels.reverse_chain. Precisions as in kernels.reverse_chain:
ieee / tf32 run the loop with torch.backends.cuda.matmul.allow_tf32 off / on; bf16 runs it under
torch.autocast(bfloat16) (bf16 operands, fp32 accumulation), the fused kernel with precision="bf16". "sample" is a
no-grad chain with a noise tensor (action sampling); "train" is forward + torch.autograd.grad of a scalar loss with
respect to all denoiser weights and biases (Diffusion-QL, DACER). On a CPU only the loop runs (the fused column would
time Triton's Python interpreter, which says nothing about the kernel), unless --tiny asks for the plumbing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kernels
from kernels.reference import ddpm_coefficients, linear_betas, make_layers, reverse_chain_reference, vp_betas

NA = "n/a"
S, A, E = 17, 6, 16  # HalfCheetah dims
# (script, T, N, pass): the scripts' real chain calls (kernels/compile_check.py has the same list)
SHAPES = [
    ("sdac", 20, 160, "sample"), ("sdac", 20, 8192, "sample"),
    ("qvpo", 20, 4, "sample"), ("qvpo", 20, 16384, "sample"),
    ("dacer", 20, 20, "sample"), ("dacer", 20, 256, "train"), ("dacer", 20, 51200, "sample"),
    ("diffusion_ql", 5, 256, "train"), ("diffusion_ql", 5, 12800, "sample"),
]
QUICK = [("sdac", 20, 160, "sample"), ("qvpo", 20, 16384, "sample"), ("diffusion_ql", 5, 256, "train")]
ORDER = {"sdac": "sxt", "dacer": "sxt", "qvpo": "xts", "diffusion_ql": "xts"}


def torch_chain(layers, state, x, temb, steps, noise, order: str):
    """The scripts' PyTorch reverse chain (sdac.py / diffusion_ql.py `reverse_chain`, backend "torch"): layer 1 is
    split into its state, x and time blocks; the state projection (with the bias) and the [T, H] time projection are
    computed once, then per step t = T-1 .. 0: eps = MLP(obs_proj + temb_proj[t] + x W1x^T), x0 = clip(sra x - srm1
    eps, -1, 1), x = c1 x0 + c2 x (+ std noise[t] for t > 0). steps[t] = (sra, srm1, c1, c2, std) as Python floats."""
    (w1, b1), rest = layers[0], layers[1:]
    n_s, n_a = state.shape[1], x.shape[1]
    if order == "sxt":
        w_obs, w_x, w_temb = w1.split([n_s, n_a, temb.shape[1]], dim=1)
    else:
        w_x, w_temb, w_obs = w1.split([n_a, temb.shape[1], n_s], dim=1)
    obs_proj = F.linear(state, w_obs, b1)  # [N, H]
    temb_proj = F.linear(temb, w_temb)  # [T, H]
    for t in range(len(steps) - 1, -1, -1):
        sra, srm1, c1, c2, std = steps[t]
        h = obs_proj + temb_proj[t] + F.linear(x, w_x)
        for i, (w, b) in enumerate(rest):
            h = F.linear(F.mish(h), w, b)
        x0 = (sra * x - srm1 * h).clamp(-1.0, 1.0)
        x = c1 * x0 + c2 * x
        if t > 0:
            x = x + std * noise[t]
    return x


def make_case(script: str, T: int, N: int, H: int, precision: str, device, seed: int = 0) -> dict:
    """Weights and inputs of one case. Weights are rounded to what the precision computes with (bf16 values for
    "bf16"), so the fp64 reference chain, the loop and the fused kernel all see the same network."""
    g = torch.Generator().manual_seed(seed)
    layers64 = make_layers(S, A, E, H, dtype=torch.float64, generator=g)
    if precision == "bf16":
        layers64 = [(w.to(torch.bfloat16).double(), b) for w, b in layers64]
    betas = (linear_betas(T) if script in ("sdac", "dacer") else vp_betas(T))
    c = ddpm_coefficients(betas)
    state = torch.randn(N, S, generator=g, dtype=torch.float64)
    x = 0.5 * torch.randn(N, A, generator=g, dtype=torch.float64)
    temb = torch.randn(T, E, generator=g, dtype=torch.float64)
    noise = torch.randn(T, N, A, generator=g, dtype=torch.float64)
    return {
        "order": ORDER[script], "layers64": layers64, "betas": betas.to(device),
        "steps": list(zip(*(c[k].tolist() for k in ("sqrt_recip_ac", "sqrt_recipm1_ac", "c1", "c2", "post_std")))),
        "inputs64": (state, x, temb, noise),
        "layers": [(w.to(device, torch.float32), b.to(device, torch.float32)) for w, b in layers64],
        "inputs": tuple(t.to(device, torch.float32) for t in (state, x, temb, noise)),
    }


@contextlib.contextmanager
def precision_mode(precision: str, device):
    """allow_tf32 for "tf32", autocast(bf16) for "bf16" (PyTorch loop side); restores the previous state."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        if precision == "bf16" and device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def reference(case: dict, train: bool, device=None):
    """fp64 chain (on `device`, default CPU): output [N, A] and (train) the gradients of loss = mean(out^2) w.r.t.
    every parameter."""
    dev = torch.device(device or "cpu")
    layers = [(w.to(dev).requires_grad_(train), b.to(dev).requires_grad_(train)) for w, b in case["layers64"]]
    state, x, temb, noise = (t.to(dev) for t in case["inputs64"])
    with torch.set_grad_enabled(train):
        out = reverse_chain_reference(layers, state, x, temb, case["betas"].to(dev), case["order"], noise=noise,
                                      clip=1.0)
    if not train:
        return out.cpu(), None
    grads = torch.autograd.grad(out.square().mean(), [p for pair in layers for p in pair])
    return out.detach().cpu(), [g.cpu() for g in grads]


def implementations(case: dict, precision: str, train: bool, device, with_compile: bool, with_fused: bool = True):
    """name -> zero-argument callable returning (out, grads or None). The PyTorch implementations run in the
    precision mode (allow_tf32 / autocast); the fused kernel gets `precision=` and nothing else."""
    layers = [(w.clone().requires_grad_(train), b.clone().requires_grad_(train)) for w, b in case["layers"]]
    params = [p for pair in layers for p in pair]
    state, x, temb, noise = case["inputs"]
    order, steps = case["order"], case["steps"]

    def wrap(chain, mode=True):
        def run():
            ctx = precision_mode(precision, device) if mode else contextlib.nullcontext()
            with ctx, torch.set_grad_enabled(train):
                out = chain()
                if not train:
                    return out, None
                return out, torch.autograd.grad(out.float().square().mean(), params)
        return run

    impls = {"loop": wrap(lambda: torch_chain(layers, state, x, temb, steps, noise, order))}
    if with_compile:
        compiled = torch.compile(torch_chain, dynamic=False, mode="reduce-overhead")
        impls["compile+graph"] = wrap(lambda: compiled(layers, state, x, temb, steps, noise, order))
    if with_fused:
        impls["fused"] = wrap(lambda: kernels.reverse_chain(layers, state, x, temb, case["betas"], order, noise=noise,
                                                            clip=1.0, precision=precision), mode=False)
    return impls


def errors(res, ref) -> str:
    out, grads = res
    e = (out.double().cpu() - ref[0]).abs().max().item()
    if grads is None:
        return f"{e:.1e}"
    num = sum(((g.double().cpu() - r) ** 2).sum() for g, r in zip(grads, ref[1])) ** 0.5
    den = sum((r ** 2).sum() for r in ref[1]) ** 0.5
    return f"{e:.1e} / {(num / den).item():.1e}"


def time_gpu(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def time_wall(fn, reps: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def run_case(script, T, N, H, precision, pass_, device, with_compile=True, reps=20, time_fused=None,
             with_fused=True) -> list[list[str]]:
    """One table row per implementation. time_fused=False runs the fused kernel for its error only (CPU)."""
    torch._dynamo.reset()  # every case compiles afresh: no recompile limit, no stale graphs
    train = pass_ == "train"
    gpu = device.type == "cuda"
    if time_fused is None:
        time_fused = gpu
    case = make_case(script, T, N, H, precision, device)
    ref = reference(case, train)
    rows = []
    for name, fn in implementations(case, precision, train, device, with_compile and gpu, with_fused).items():
        head = [pass_, script, str(T), str(N), str(H), precision, name]
        try:
            t0 = time.perf_counter()
            res = fn()  # first call: compiles (Triton JIT / torch.compile)
            first = time.perf_counter() - t0
            err = errors(res, ref)
            if name == "fused" and not time_fused:
                rows.append(head + [NA, NA, f"{first:.1f}", err])
                continue
            wall = time_wall(fn, reps)
            g = time_gpu(fn) if gpu else wall
            rows.append(head + [f"{g:,.1f}" if gpu else NA, f"{wall:,.1f}", f"{first:.1f}", err])
        except Exception as e:  # a failing implementation is a row, not a crash
            msg = str(e).splitlines()[0][:120] if str(e) else ""
            rows.append(head + [f"failed: {type(e).__name__}: {msg}", "", "", ""])
            print(f"# {head}: {type(e).__name__}: {msg}", file=sys.stderr)
    return rows


COLS = ["pass", "script", "T", "N", "H", "precision", "impl", "gpu us", "wall us", "first call s",
        "max err (out / grad rel)"]


def print_table(rows) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLS)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(COLS, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |", flush=True)


def environment(device) -> str:
    import triton

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no GPU)"
    return (f"device: {dev}; torch {torch.__version__}, triton {triton.__version__}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="H 256, tf32 + bf16, three call shapes")
    ap.add_argument("--tiny", action="store_true", help="T 2, N 5, H 32, ieee: a CPU smoke run of every column")
    ap.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden widths (default 256 512)")
    ap.add_argument("--precision", nargs="+", default=None, choices=("ieee", "tf32", "bf16"),
                    help="default tf32 bf16 (ieee on a CPU)")
    ap.add_argument("--only", nargs="+", default=None, choices=sorted(ORDER), help="scripts")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile + CUDA graph column")
    ap.add_argument("--reps", type=int, default=20, help="wall-time repetitions")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if args.tiny:
        shapes, hiddens, precisions = [("sdac", 2, 5, "sample"), ("diffusion_ql", 2, 5, "train")], [32], ["ieee"]
    else:
        shapes = QUICK if args.quick else SHAPES
        hiddens = args.hidden or ([256] if args.quick else [256, 512])
        precisions = args.precision or (["tf32", "bf16"] if gpu else ["ieee"])
    if not gpu and "bf16" in precisions:
        sys.exit("kernels.bench: error: bf16 needs a GPU (Triton's interpreter computes bf16 wrongly)")
    if args.only:
        shapes = [s for s in shapes if s[0] in args.only]
    print(f"# reverse chain, S={S} A={A} temb={E}; {environment(device)}")
    rows = []
    for precision in precisions:
        for H in hiddens:
            for script, T, N, pass_ in shapes:
                rows += run_case(script, T, N, H, precision, pass_, device, with_compile=not args.skip_compile,
                                 reps=args.reps if not args.tiny else 2, time_fused=gpu, with_fused=gpu or args.tiny)
    print_table(rows)


if __name__ == "__main__":
    main()
