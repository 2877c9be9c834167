"""Compile the fused kernels for Hopper (sm_90) on a machine without a GPU, exactly as Triton's JIT would.

    python -m kernels.compile_check                         # every variant of kernels/README.md's table
    python -m kernels.compile_check --precision bf16 --hidden 256 --only sdac
    python -m kernels.compile_check --list                  # the variants, without compiling

For each variant (precision, hidden width, one of the scripts' real call shapes) the wrapper code of `kernels.chain`
builds the launch arguments from real (CPU, never touched) tensors of that shape -- `_forward_launch` /
`_backward_launch`, the same functions the launch uses -- and Triton's own JIT binder derives the specialization
from them (ints equal to 1 become constants, ints divisible by 16 and 16-byte-aligned pointers are marked), so the
compiled kernel is the one the GPU would run. It is compiled through TTIR -> TTGIR -> LLVM -> PTX -> cubin with the
ptxas that ships with the triton wheel, and one markdown row is printed per variant:

  compile s    wall seconds of the compile (a cached binary is shown as "= row k")
  regs, spill  registers per thread and spill-store bytes (ptxas -v)
  smem         shared memory per CTA (bytes)
  mma          wgmma (SASS HGMMA), mma.sync (HMMA) or none (FFMA only), with the TTGIR warpsPerCTA of each MMA layout
  live across   2-D pointer/index tensors the TTGIR keeps live across the step loop: per-element / broadcast
  SASS counts  static instruction counts: the whole cubin, then inside the step loop (the loop over T): all, MMA
               instructions, TMA loads (UTMALDG), cp.async (LDGSTS), global loads/stores (LDG/STG), local-memory
               traffic (LDL/STL: spills), barriers (BAR)

Compiling needs a few CPU seconds to minutes per kernel; run it alone (OMP_NUM_THREADS=1). No GPU, no driver.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time

# The kernels must be defined as compiled, not interpreted, functions; `import kernels` (which `python -m` does
# before this module runs) switches the interpreter on when there is no GPU, so start again with it off.
if os.environ.get("TRITON_INTERPRET") != "0":
    os.execve(sys.executable, [sys.executable, "-m", "kernels.compile_check", *sys.argv[1:]],
              {**os.environ, "TRITON_INTERPRET": "0"})

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from kernels import chain  # noqa: E402


S, A, E = 17, 6, 16  # HalfCheetah dims, as in the tables
# (script, T, N, pass): the scripts' real chain calls. "sample" = no-grad forward; "train" = forward + backward.
SHAPES = [
    ("sdac", 20, 160, "sample"), ("sdac", 20, 8192, "sample"),
    ("qvpo", 20, 4, "sample"), ("qvpo", 20, 16384, "sample"),
    ("dacer", 20, 20, "sample"), ("dacer", 20, 256, "train"), ("dacer", 20, 51200, "sample"),
    ("diffusion_ql", 5, 256, "train"), ("diffusion_ql", 5, 12800, "sample"),
    ("large_batch_train", 5, 12800, "train"),  # not a script call: the warpgroup tiling of the training kernels
]
PRECISION_DTYPE = {"bf16": torch.bfloat16, "tf32": torch.float32, "ieee": torch.float32, "fp16": torch.float16}


def _problem(precision: str, H: int, T: int, N: int, rng: bool, training: bool) -> chain._Problem:
    """A `_Problem` as `reverse_chain` builds it for this call shape (uninitialised CPU tensors: nothing runs)."""
    dt = PRECISION_DTYPE[precision]
    W1 = torch.empty(H, S + A + E, dtype=dt)
    W1s, W1x = W1[:, :S], W1[:, S:S + A]  # order "sxt" (SDAC, DACER); "xts" gives the same strides class
    W2, W3 = torch.empty(H, H, dtype=dt), torch.empty(H, H, dtype=dt)
    W4 = torch.empty(A, H, dtype=dt)
    b = torch.empty(H, dtype=torch.float32)
    b4 = torch.empty(A, dtype=torch.float32)
    state, x = torch.empty(N, S), torch.empty(N, A)
    noise = None if rng else torch.empty(T, N, A)  # the scripts pass noise tensors; rng: in-kernel Philox instead
    seed = torch.zeros(1, dtype=torch.int64) if rng else None
    tb, coef = torch.empty(T, H), torch.empty(5, T)
    prec = {"bf16": "tf32", "fp16": "tf32", "tf32": "tf32", "ieee": "ieee"}[precision]
    return chain._Problem(state, x, tb, W1s, W1x, W2, b, W3, b, W4, b4, coef, noise, seed, 1.0, False, prec,
                          training=training)


def _launches(precision: str, H: int, T: int, N: int, pass_: str, rng: bool = False):
    """[(kernel name, fn, args, kwargs, cfg)] for one call: the forward, plus the backward for "train"."""
    training = pass_ == "train"
    p = _problem(precision, H, T, N, rng, training)
    grid, args, kw, out, ws = chain._forward_launch(p, training)
    res = [("fwd_train" if training else "fwd", chain._chain_fwd_kernel, args, kw, p.cfg)]
    if training:
        wsx, wsz = ws
        _, bargs, bkw, _ = chain._backward_launch(p, torch.empty(N, A), wsx, wsz)
        res.append(("bwd", chain._chain_bwd_kernel, bargs, bkw, p.cfg))
    return res


def _sass_counts(cubin: bytes) -> dict:
    """Static SASS instruction counts. "total" is the whole kernel; the other counts are the step loop's: the
    instructions between the target and the source of the longest backward branch (the loop over T contains every
    other loop of the step). The short out-of-line stubs the loop jumps to (mbarrier wait spins) are not included."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    instr = [(int(a, 16), op, rest) for a, op, rest in
             re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)]
    loops = [(addr, int(m.group(1), 16)) for addr, op, rest in instr if op.startswith("BRA")
             for m in [re.search(r"0x([0-9a-f]+)", rest)] if m and int(m.group(1), 16) < addr]
    lo, hi = max(loops, key=lambda b: b[0] - b[1])[::-1] if loops else (0, -1)
    ops = [op for addr, op, _ in instr if lo <= addr <= hi]
    c = {"total": len(instr), "loop": len(ops)}
    for key in ("HGMMA", "HMMA", "FFMA", "UTMALDG", "LDGSTS", "LDG", "STG", "LDL", "STL", "BAR"):
        c[key] = sum(1 for o in ops if o.startswith(key) and not (key == "LDG" and o.startswith("LDGSTS")))
    return c


def hoisted_across_step_loop(ttgir: str) -> dict:
    """Tensors the compiler keeps live across the step loop (defined before the `scf.for ... to %T`, used inside):
    -> {"full": [shapes of 2-D pointer/index tensors whose every element differs], "bcast": [shapes of broadcasts of
    a row or column vector, which hold only a few distinct values per thread]}. "full" is what costs registers."""
    lines = ttgir.splitlines()
    start = next((i for i, line in enumerate(lines) if re.search(r"scf\.for %\S+ = %\S+ to %T step", line)), None)
    if start is None:
        return {"full": [], "bcast": []}
    depth, end = 0, start
    for end in range(start, len(lines)):
        depth += lines[end].count("{") - lines[end].count("}")
        if depth <= 0 and end > start:
            break
    body = "\n".join(lines[start:end + 1])
    res = {"full": [], "bcast": []}
    level, levels = 0, []  # brace depth of each line: only definitions at the step loop's own level are visible in it
    for line in lines[:start]:
        levels.append(level)
        level += line.count("{") - line.count("}")
    for line, lv in zip(lines[:start], levels):
        if lv != level:
            continue
        m = re.match(r"\s*(%[\w.]+)(?::\d+)? = (\S+)", line)
        # the result type: after "->" for conversions, else the first type after " : " (tt.addptr's is the pointer)
        rtype = line.split("->")[-1] if "->" in line else line.split(" : ", 1)[-1].split(", ")[0]
        types = re.findall(r"tensor<([0-9x]+)x(!tt\.ptr<\w+>|i32|i64)", rtype)
        if not m or not types:
            continue
        dims = [int(d) for d in types[-1][0].split("x")]
        if len(dims) < 2 or min(dims) == 1 or not re.search(re.escape(m.group(1)) + r"\b", body):
            continue
        res["bcast" if m.group(2) == "tt.broadcast" else "full"].append("x".join(map(str, dims)) +
                                                                        ("p" if "ptr" in types[-1][1] else "i"))
    return res


def compile_one(fn, args, kw, arch: int = 90, dump: str | None = None, tag: str = "") -> dict:
    """Compile fn for (args, kw) at the JIT's specialization; returns the row's measurements."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    src = ASTSource(fn, signature, constexprs, attrs)
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(log):
        k = triton.compile(src, target=target, options=options.__dict__)
    secs = time.time() - t0
    text = log.getvalue()
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttir", "ttgir", "ptx"):
            with open(os.path.join(dump, f"{tag}.{ext}"), "w") as f:
                f.write(k.asm[ext])
        with open(os.path.join(dump, f"{tag}.cubin"), "wb") as f:
            f.write(k.asm["cubin"])
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    ttgir = k.asm["ttgir"]
    mma = sorted(set(re.findall(r"nvidia_mma<\{versionMajor = (\d)[^}]*warpsPerCTA = \[([0-9, ]+)\]", ttgir)))
    sass = _sass_counts(k.asm["cubin"])
    hoisted = hoisted_across_step_loop(ttgir)
    kind = "wgmma" if sass["HGMMA"] else "mma.sync" if sass["HMMA"] else "none"
    return {"secs": secs, "regs": int(regs.group(1)) if regs else None, "spill": int(spill.group(1)) if spill else None,
            "stack": int(stack.group(1)) if stack else None,
            "smem": k.metadata.shared, "mma": kind,
            "warps": " ".join(f"v{v}[{w.replace(' ', '')}]" for v, w in mma) or "-",
            "sass": sass, "hoisted": hoisted, "key": (str(signature), str(constexprs), str(attrs), str(sorted(options.__dict__.items())))}


def variants(precisions, hiddens, only):
    for prec in precisions:
        for H in hiddens:
            for script, T, N, pass_ in SHAPES:
                if only and script not in only:
                    continue
                yield prec, H, script, T, N, pass_


COLS = ["#", "precision", "H", "script", "T", "N", "kernel", "BM/warps/BN/BK", "compile s", "regs", "spill B", "stack B",
        "smem B", "2-D tensors live across T loop (full / broadcast)", "mma (warpsPerCTA)", "SASS total", "step loop: instr", "MMA", "UTMALDG", "LDGSTS", "LDG/STG",
        "LDL/STL", "BAR"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", nargs="+", default=["bf16", "tf32"], choices=sorted(PRECISION_DTYPE))
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--only", nargs="+", default=None, choices=sorted({s[0] for s in SHAPES}), help="scripts")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    ap.add_argument("--rng", action="store_true", help="noise=None (in-kernel Philox) instead of a noise tensor")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--dump", default=None, help="write each kernel's TTIR, TTGIR, PTX and cubin to this folder")
    ap.add_argument("--config", default=None, metavar="BM,WARPS,BN,BK,STAGES",
                    help="force one block configuration instead of the wrapper's choice (for tuning)")
    args = ap.parse_args(argv)
    if args.config:
        bm, nw, bn, bk, ns = map(int, args.config.split(","))
        chain._CONFIG_OVERRIDE = {"BM": bm, "num_warps": nw, "BN": bn, "BK": bk, "num_stages": ns}
    print(f"# sm_{args.arch}, triton {triton.__version__}, torch {torch.__version__}, S={S} A={A} temb={E}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    print("| " + " | ".join(COLS) + " |")
    print("|" + "|".join("---" for _ in COLS) + "|", flush=True)
    seen: dict = {}
    failures, row = 0, 0
    for prec, H, script, T, N, pass_ in variants(args.precision, args.hidden, args.only):
        for name, fn, kargs, kw, cfg in _launches(prec, H, T, N, pass_, args.rng):
            row += 1
            head = [str(row), prec, str(H), script, str(T), str(N), name,
                    f"{cfg['BM']}/{cfg['num_warps']}/{cfg['BN']}/{cfg['BK']}"]
            if args.list:
                print("| " + " | ".join(head + [""] * (len(COLS) - len(head))) + " |", flush=True)
                continue
            try:
                r = compile_one(fn, kargs, kw, args.arch, args.dump, f"{row}_{prec}_H{H}_{script}_N{N}_{name}")
            except Exception as e:  # report every variant, fail at the end
                failures += 1
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                print("| " + " | ".join(head + [f"FAILED {type(e).__name__}: {msg}"] + [""] * (len(COLS) - 9)) + " |",
                      flush=True)
                continue
            first = seen.setdefault(r["key"], row)
            s = r["sass"]
            secs = f"{r['secs']:.1f}" if first == row else f"= row {first}"
            print("| " + " | ".join(head + [
                secs, str(r["regs"]), str(r["spill"]), str(r["stack"]), str(r["smem"]),
                f"{len(r['hoisted']['full'])} / {len(r['hoisted']['bcast'])}", f"{r['mma']} {r['warps']}", str(s["total"]), str(s["loop"]),
                str(s["HGMMA"] or s["HMMA"]), str(s["UTMALDG"]), str(s["LDGSTS"]), f"{s['LDG']}/{s['STG']}",
                f"{s['LDL']}/{s['STL']}", str(s["BAR"])]) + " |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
