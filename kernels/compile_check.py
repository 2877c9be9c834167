"""Compile the fused kernels for a GPU architecture without a GPU: `python -m kernels.compile_check`.

Runs Triton's real compiler (frontend -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin through the ptxas bundled with the
triton wheel) for the block configurations `kernels.chain` picks on a GPU, and prints each kernel's shared-memory
use. This catches what the CPU interpreter cannot: compile errors, dot shapes the GPU rejects, shared-memory overflow
(> 232 448 B per block on Hopper). It does not run anything, so it says nothing about speed or numerical results.
Slow (about a minute or more per kernel on a small CPU), hence not part of the test suite.

    python -m kernels.compile_check                      # fp16/bf16/fp32 x hidden 256/512, fwd (infer+train) + bwd
    python -m kernels.compile_check --dtype bf16 --hidden 512 --arch 90
"""

from __future__ import annotations

import argparse
import os
import sys
import time


import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from . import chain  # noqa: E402

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _compile(fn, ptr_types: dict, constexprs: dict, num_warps: int, arch: int):
    sig = {}
    for p in fn.params:
        if p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.name in ptr_types:
            sig[p.name] = ptr_types[p.name]
        elif p.name == "clip_val":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"  # sizes and strides
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def check(dtype: torch.dtype, H: int, N: int, A: int, arch: int, training: bool, backward: bool):
    cfg = chain._config_gpu(N, H, dtype)
    dt = _TL[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    prec = "ieee" if dtype == torch.float32 else "tf32"
    a_pad = max(16, chain._next_pow2(A))
    if backward:
        ptrs = {"gout_ptr": "*fp32", "w1x_ptr": f"*{dt}", "w2_ptr": f"*{dt}", "w3_ptr": f"*{dt}", "w4_ptr": f"*{dt}",
                "b4_ptr": f"*{dt}", "coef_ptr": f"*{acc}", "wsx_ptr": f"*{acc}", "wsz_ptr": f"*{acc}",
                "wsd_ptr": f"*{acc}", "wsd4_ptr": f"*{acc}", "dsp_ptr": f"*{acc}", "dx_ptr": f"*{acc}"}
        const = dict(H=H, A_PAD=a_pad, BM=cfg["BM"], BN=cfg["BN"], HAS_CLIP=True, ACC_FP64=acc == "fp64", PREC=prec)
        return cfg, _compile(chain._chain_bwd_kernel, ptrs, const, cfg["num_warps"], arch)
    ptrs = {"state_ptr": "*fp32", "x_ptr": "*fp32", "noise_ptr": "*fp32", "seed_ptr": "*i64", "tb_ptr": f"*{acc}",
            "w1s_ptr": f"*{dt}", "w1x_ptr": f"*{dt}", "w2_ptr": f"*{dt}", "b2_ptr": f"*{dt}", "w3_ptr": f"*{dt}",
            "b3_ptr": f"*{dt}", "w4_ptr": f"*{dt}", "b4_ptr": f"*{dt}", "coef_ptr": f"*{acc}", "out_ptr": "*fp32",
            "hs_ptr": f"*{dt}", "sp_ptr": f"*{acc}", "wsx_ptr": f"*{acc}", "wsz_ptr": f"*{acc}"}
    const = dict(H=H, A_PAD=a_pad, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], HAS_CLIP=True, FINAL_NOISE=False,
                 NOISE_FROM_PTR=not training, TRAINING=training, ACC_FP64=acc == "fp64", PREC=prec)
    return cfg, _compile(chain._chain_fwd_kernel, ptrs, const, cfg["num_warps"], arch)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), nargs="+", default=["fp16", "bf16", "fp32"])
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batch", type=int, default=16384, help="N (selects BM as on a GPU)")
    ap.add_argument("--actions", type=int, default=17, help="A (selects A_PAD)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    args = ap.parse_args(argv)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    failures = 0
    for name in args.dtype:
        for H in args.hidden:
            for kind in ("forward (sampling, noise tensor)", "forward (training, in-kernel RNG)", "backward"):
                t0 = time.time()
                try:
                    cfg, k = check(dtypes[name], H, args.batch, args.actions, args.arch,
                                   training="training" in kind, backward=kind == "backward")
                    print(f"sm_{args.arch} {name} H={H} BM={cfg['BM']} BN={cfg['BN']} {kind}: OK, "
                          f"shared memory {k.metadata.shared} B ({time.time() - t0:.0f} s)", flush=True)
                except Exception as e:  # report every configuration, then fail at the end
                    failures += 1
                    print(f"sm_{args.arch} {name} H={H} {kind}: FAILED {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else ''}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    # The kernels (and Triton's own library functions) are defined compiled or interpreted when triton is first
    # imported; `python -m kernels.compile_check` has already imported the package, which on a machine without a GPU
    # switches the interpreter on. So run again in a fresh process with the interpreter off.
    if os.environ.get("TRITON_INTERPRET") != "0":
        os.execve(sys.executable, [sys.executable, "-m", "kernels.compile_check", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "0"})
    main()
