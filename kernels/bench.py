"""Benchmark of the reverse diffusion chain: eager PyTorch, torch.compile, CUDA graphs, fused Triton.

    python -m kernels.bench                    # T in {5, 20} x batch in {1, 256, 12800, 16384}, forward and training
    python -m kernels.bench --tiny --skip-compile   # seconds on a CPU (what the tests run)
    python -m kernels.bench --dtype bf16       # weights/activations in bf16 for every column (GPU only)

Prints ONE table (microseconds per call, median; speed-ups of the fused kernel). "forward" is one no-grad chain
(action sampling: SDAC/QVPO candidates); "train" is forward + backward to all denoiser weights and biases
(Diffusion-QL/DACER). Columns: eager; torch.compile (default mode); the eager loop captured in one CUDA graph;
torch.compile(mode="reduce-overhead"), i.e. compiled code replayed through CUDA graphs; the fused kernel. The network is the SDAC/DACER/Diffusion-QL denoiser on HalfCheetah dims: S=17, A=6, temb 16,
hidden 256, order "sxt", linear schedule, x0 clip 1, noise passed as a tensor. On a GPU timings come from
`triton.testing.do_bench` (CUDA events); on a CPU the CUDA-graph and fused columns print "n/a (no GPU)": the fused
column would time Triton's Python interpreter, which says nothing about the kernel.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kernels
from kernels.reference import ddpm_coefficients, linear_betas, make_layers

NA_GPU = "n/a (no GPU)"


def eager_chain(layers, state, x, temb, steps, noise):
    """The scripts' eager sampling loop: per step cat -> 4 Linear/Mish -> DDPM update with Python-float coefficients.
    steps[t] = (sqrt_recip_ac, sqrt_recipm1_ac, c1, c2, post_std)."""
    N = x.shape[0]
    for t in range(len(steps) - 1, -1, -1):
        sra, srm1, c1, c2, std = steps[t]
        h = torch.cat([state, x, temb[t].expand(N, -1)], 1)
        for i, (w, b) in enumerate(layers):
            h = F.linear(h, w, b)
            if i < 3:
                h = F.mish(h)
        x0 = (sra * x - srm1 * h).clamp(-1.0, 1.0)
        x = c1 * x0 + c2 * x
        if t > 0:
            x = x + std * noise[t]
    return x


def _time_cpu(fn, reps):
    fn()  # warm-up (and compilation for torch.compile)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def _time_gpu(fn):
    import triton.testing

    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _graphed(fn):
    """Captures fn() (outputs are static tensors) into a CUDA graph after a side-stream warm-up; returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_case(T, B, pass_, dims, dtype, device, reps, skip_compile=False):
    S, A, E, H = dims
    gpu = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    layers = [(w.to(device, dtype), b.to(device, dtype)) for w, b in make_layers(S, A, E, H, generator=g)]
    params = [t for pair in layers for t in pair]
    state = torch.randn(B, S, generator=g).to(device, dtype)
    x = (0.5 * torch.randn(B, A, generator=g)).to(device, dtype)
    temb = torch.randn(T, E, generator=g).to(device, dtype)
    noise = torch.randn(T, B, A, generator=g).to(device, dtype)
    betas64 = linear_betas(T)
    c = ddpm_coefficients(betas64)
    steps = list(zip(*(c[k].tolist() for k in ("sqrt_recip_ac", "sqrt_recipm1_ac", "c1", "c2", "post_std"))))
    betas = betas64.to(device)
    compiled = torch.compile(eager_chain, dynamic=False)
    compiled_graphed = torch.compile(eager_chain, dynamic=False, mode="reduce-overhead")
    train = pass_ == "train"
    for p in params:
        p.requires_grad_(train)

    def make(chain):
        if not train:
            def fwd():
                with torch.no_grad():
                    return chain()
            return fwd

        def step():
            return torch.autograd.grad(chain().float().square().mean(), params)
        return step

    impls = {
        "eager": make(lambda: eager_chain(layers, state, x, temb, steps, noise)),
        "compile": make(lambda: compiled(layers, state, x, temb, steps, noise)),
        "compile+graph": make(lambda: compiled_graphed(layers, state, x, temb, steps, noise)),
        "fused": make(lambda: kernels.reverse_chain(layers, state.float(), x.float(), temb.float(), betas, "sxt",
                                                    noise=noise.float(), clip=1.0)),
    }
    res = {}
    for name in ("eager", "compile", "cuda graph", "compile+graph", "fused"):
        if not gpu and name in ("cuda graph", "compile+graph", "fused"):
            res[name] = NA_GPU
            continue
        if skip_compile and name.startswith("compile"):
            res[name] = "skipped"
            continue
        try:
            fn = _graphed(impls["eager"]) if name == "cuda graph" else impls[name]
            res[name] = _time_gpu(fn) if gpu else _time_cpu(fn, reps)
        except Exception as e:  # a failing column is reported in the table, not hidden
            res[name] = f"failed: {type(e).__name__}"
            print(f"# {pass_} T={T} B={B} {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                  file=sys.stderr)
    return res


def _fmt(v):
    return f"{v:,.1f}" if isinstance(v, float) else v


def _speedup(base, fused):
    return f"{base / fused:.1f}x" if isinstance(base, float) and isinstance(fused, float) else "n/a"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (T=2, batch 1 and 5, hidden 32): a smoke run")
    ap.add_argument("--dtype", choices=("fp32", "tf32", "fp16", "bf16"), default="fp32",
                    help="fp32 (IEEE dots everywhere), tf32 (allow TF32 matmuls everywhere), fp16 or bf16 weights")
    ap.add_argument("--T", type=int, nargs="+", default=None, help="diffusion steps (default 5 20)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 256 12800 16384)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden width (default 256)")
    ap.add_argument("--reps", type=int, default=5, help="CPU timing repetitions (GPU uses do_bench)")
    ap.add_argument("--skip-compile", action="store_true",
                    help="leave out the torch.compile column (compiling each case takes minutes on a CPU)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "bf16" and device.type != "cuda":
        sys.exit("kernels.bench: error: --dtype bf16 needs a GPU (Triton's interpreter computes bf16 wrongly)")
    Ts = args.T or ([2] if args.tiny else [5, 20])
    Bs = args.batch or ([1, 5] if args.tiny else [1, 256, 12800, 16384])
    H = args.hidden or (32 if args.tiny else 256)
    dims = (17, 6, 16, H)
    torch.backends.cuda.matmul.allow_tf32 = args.dtype == "tf32"
    dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (no GPU)"
    import triton

    print(f"# reverse chain, S={dims[0]} A={dims[1]} temb={dims[2]} hidden={H}, {args.dtype}; device: {dev_name}; "
          f"torch {torch.__version__}, triton {triton.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    cols = ["pass", "T", "batch", "eager us", "compile us", "cuda graph us", "compile+graph us", "fused us",
            "fused vs eager", "fused vs compile", "fused vs cuda graph", "fused vs compile+graph"]
    rows = []
    for pass_ in ("forward", "train"):
        for T in Ts:
            for B in Bs:
                r = run_case(T, B, pass_, dims, dtype, device, args.reps, args.skip_compile)
                f = r["fused"]
                rows.append([pass_, str(T), str(B), _fmt(r["eager"]), _fmt(r["compile"]), _fmt(r["cuda graph"]),
                             _fmt(r["compile+graph"]), _fmt(f), _speedup(r["eager"], f), _speedup(r["compile"], f),
                             _speedup(r["cuda graph"], f), _speedup(r["compile+graph"], f)])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


if __name__ == "__main__":
    main()
