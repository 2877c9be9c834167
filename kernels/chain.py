"""Fused DDPM reverse chain in Triton: one launch runs all T denoising steps of the 4-layer Mish MLP for a row block.

Layout follows the Triton tutorials: kernels (`_chain_fwd_kernel`, `_chain_bwd_kernel`) -> launch helpers ->
`torch.autograd.Function` -> the public `reverse_chain` (its API is in kernels/README.md).

Algebra (kernels/README.md, "Design"). With W1 split by input block, layer 1 of step t is
    z1 = x_t @ W1x^T + (state @ W1s^T) + (temb[t] @ W1t^T + b1)
The state projection sp = state @ W1s^T is computed once per row block before the step loop (inside the kernel);
the time-bias table tb[t] = temb[t] @ W1t^T + b1 ([T, H]) is computed once per call with ordinary PyTorch ops,
so autograd carries its gradient to temb, W1t and b1. Per step the kernel then runs a K = A_PAD dot for layer 1,
two H x H dots, and an N = A_PAD dot for layer 4.

Tiling (kernels/README.md, "Tiling"). A program owns BM rows; BM = 16 x num_warps, so every warp computes its own
rows (one warp per 16 rows for small N, mma.sync; one warpgroup per 64 rows for N >= 4096, wgmma). A hidden layer is
two dynamic loops: over BN-wide output chunks and, inside, over BK-wide K chunks, acc += act[BM, BK] @ W^T[BK, BN].
The weight tiles come through tensor descriptors (TMA on Hopper, no per-element addresses in registers) and the
activation tiles from a per-program scratch row block in global memory (L1/L2 resident); the compiler pipelines the
K loop (num_stages), so the loads of the next tiles overlap the current dot. Loop bounds are dynamic, so no tile
address is loop-invariant and nothing per-element is kept live across the step loop. mish(z) of each output chunk is
stored to the other scratch buffer; a CTA barrier separates the layers.

Precision. `precision` picks the dot operand dtype: "ieee" fp32 with IEEE dots, "tf32" fp32 with TF32 dots, "bf16";
None follows the weights (fp32: TF32 iff torch.backends.cuda.matmul.allow_tf32; fp16; fp64 for gradcheck).
Accumulation, biases, the state projection and all DDPM arithmetic are fp32 (fp64 with fp64 weights).

Backward (kernels/README.md, "Design"). The training-mode forward stores x_t ([T, N, A]) and the three pre-activations z1..z3
([3, T, N, H]) to a workspace. `_chain_bwd_kernel` is row-parallel and walks t = 0 -> T-1 (the reverse of sampling):
it recomputes eps from z3, applies the DDPM step's Jacobian (clip mask included; noise has no gradient), pushes the
gradient through the four layers with W^T tiles and mish'(z), writes the per-layer deltas d1..d4 to the workspace and
accumulates dL/d(sp). Weight and bias gradients are then plain GEMMs / sums over the T*N rows in PyTorch (cuBLAS on a
GPU): deterministic, no atomics.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .reference import ORDERS, ddpm_coefficients



@triton.jit
def _mish(z):
    # mish(z) = z * tanh(softplus(z)); with n = e^z, tanh(log(1 + n)) = n(n + 2) / (n(n + 2) + 2).
    # tl.exp only (no libdevice tanh/log1p: the interpreter cannot run libdevice). For z > 20 mish(z) = z in fp32,
    # which is also where PyTorch's softplus switches to the identity; clamping the exponent avoids inf/inf.
    n = tl.exp(tl.minimum(z, 20.0))
    w = n * (n + 2.0)
    return tl.where(z > 20.0, z, z * w / (w + 2.0))


@triton.jit
def _mish_grad(z):
    # d/dz mish = tanh(sp) + z * sech^2(sp) * sigmoid(z), sp = softplus(z). With w = n(n + 2), d = w + 2:
    # tanh(sp) = w / d, sech^2(sp) = 1 - (w/d)^2 = 4 (w + 1) / d^2, sigmoid(z) = n / (1 + n).
    n = tl.exp(tl.minimum(z, 20.0))
    w = n * (n + 2.0)
    d = w + 2.0
    g = w / d + z * (4.0 * (w + 1.0) / (d * d)) * (n / (1.0 + n))
    return tl.where(z > 20.0, 1.0, g)


@triton.jit
def _dense_mish(src, w_desc, b_ptr, dst, z_ptr, zrow, rmask,
                BM: tl.constexpr, H: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TRAINING: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr):
    """One hidden layer of the forward chain: dst[:, :H] = mish(src[:, :H] @ W^T + b).

    src / dst are [BM, 1] pointers to this program's rows of the activation scratch; W [H, H] is read through a tensor
    descriptor in [BN, BK] tiles (TMA on Hopper: no per-element address registers). Both loops are dynamic, so no tile
    address is loop-invariant and nothing is hoisted out of the step loop; the compiler pipelines the K loop (weight
    and activation tiles for k + 1.. are in flight while the dot of k runs). In training mode the pre-activation z
    also goes to row zrow of the [*, H] workspace at z_ptr."""
    ck = tl.arange(0, BK)
    cn = tl.arange(0, BN)
    for n0 in range(0, H, BN):
        acc = tl.zeros((BM, BN), dtype=ACC)
        for k0 in range(0, H, BK):
            a = tl.load(src + (k0 + ck)[None, :])  # [BM, BK] activations (scratch rows exist for every program row)
            w = w_desc.load([n0, k0])  # [BN, BK] tile of W = a [BK, BN] tile of W^T
            acc = tl.dot(a, w.T, acc, input_precision=PREC, out_dtype=ACC)
        z = acc + tl.load(b_ptr + n0 + cn).to(ACC)[None, :]
        if TRAINING:
            tl.store(z_ptr + zrow + (n0 + cn)[None, :], z, mask=rmask[:, None])
        tl.store(dst + (n0 + cn)[None, :], _mish(z).to(dst.dtype.element_ty))


@triton.jit
def _dense_mish_backward(src, w_desc, z_ptr, dst, rmask, DT: tl.constexpr,
                         BM: tl.constexpr, H: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         ACC: tl.constexpr, PREC: tl.constexpr):
    """One hidden layer of the chain backward: dst = (src @ W) * mish'(z). src, z_ptr and dst are [BM, 1] pointers to
    this program's rows of [*, H] workspace slabs (masked by rmask); W [H, H] is read in [BK, BN] tiles through a
    tensor descriptor. Dynamic loops, as in the forward."""
    ck = tl.arange(0, BK)
    cn = tl.arange(0, BN)
    for n0 in range(0, H, BN):
        acc = tl.zeros((BM, BN), dtype=ACC)
        for k0 in range(0, H, BK):
            a = tl.load(src + (k0 + ck)[None, :], mask=rmask[:, None], other=0.0).to(DT)
            w = w_desc.load([k0, n0])  # [BK, BN] tile of W (rows = layer outputs = K of this product)
            acc = tl.dot(a, w, acc, input_precision=PREC, out_dtype=ACC)
        z = tl.load(z_ptr + (n0 + cn)[None, :], mask=rmask[:, None], other=0.0)
        tl.store(dst + (n0 + cn)[None, :], acc * _mish_grad(z), mask=rmask[:, None])


@triton.jit
def _chain_fwd_kernel(
    state_ptr, st_s0, st_s1,  # [N, S] any float dtype, any strides
    x_ptr, x_s0, x_s1,  # [N, A] x_T
    noise_ptr, nz_s0, nz_s1, nz_s2,  # [T, N, A] (unused when NOISE_FROM_PTR is False)
    seed_ptr,  # int64 [1] (unused when NOISE_FROM_PTR is True)
    tb_ptr,  # [T, H] contiguous, ACC dtype: temb[t] @ W1t^T + b1
    w1s_ptr, w1s_s0, w1s_s1,  # [H, S] view of W1
    w1x_desc,  # tensor descriptor over W1x zero-padded to [H, A_PAD] (block [BN, A_PAD])
    w2_desc, b2_ptr,  # tensor descriptor over W2 [H, H] (block [BN, BK]), bias [H]
    w3_desc, b3_ptr,
    w4_desc, b4_ptr,  # tensor descriptor over W4 zero-padded to [A_PAD, H] (block [A_PAD, BK]), bias [A]
    coef_ptr,  # [5, T] contiguous, ACC dtype: rows sqrt(1/ac), sqrt(1/ac - 1), c1, c2, post_std
    out_ptr, out_s0, out_s1,  # [N, A] result
    hs_ptr,  # [2, G*BM, H] DT scratch for the layer activations (G = number of programs)
    sp_ptr,  # [G*BM, H] ACC scratch for the state projection
    wsx_ptr,  # [T, N, A] ACC workspace: x_t entering step t (TRAINING only)
    wsz_ptr,  # [3, T, N, H] ACC workspace: pre-activations z1..z3 (TRAINING only)
    N, S, A, T, clip_val,
    H: tl.constexpr, A_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_CLIP: tl.constexpr, FINAL_NOISE: tl.constexpr, NOISE_FROM_PTR: tl.constexpr, TRAINING: tl.constexpr,
    ACC_FP64: tl.constexpr, PREC: tl.constexpr,
):
    DT = hs_ptr.dtype.element_ty  # dot operand dtype
    ACC: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    GBM = tl.num_programs(0) * BM
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # global rows = scratch rows
    rmask = rows < N
    cols_a = tl.arange(0, A_PAD)
    amask = cols_a < A
    xa_mask = rmask[:, None] & amask[None, :]
    ck = tl.arange(0, BK)
    cn = tl.arange(0, BN)
    sp_rows = sp_ptr + rows[:, None] * H  # [BM, 1] row pointers; column offsets are added inside dynamic loops
    buf0 = hs_ptr + rows[:, None] * H
    buf1 = hs_ptr + GBM * H + rows[:, None] * H

    # ---- state projection sp = state @ W1s^T, once per row block (K-chunked over S, N-chunked over H) ----
    for n0 in range(0, H, BN):
        acc = tl.zeros((BM, BN), dtype=ACC)
        for k0 in range(0, S, BK):
            ks = k0 + ck
            kmask = ks < S
            s = tl.load(state_ptr + rows[:, None] * st_s0 + ks[None, :] * st_s1,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w1s_ptr + (n0 + cn)[None, :] * w1s_s0 + ks[:, None] * w1s_s1, mask=kmask[:, None], other=0.0)
            acc = tl.dot(s.to(DT), w, acc, input_precision=PREC, out_dtype=ACC)
        tl.store(sp_rows + (n0 + cn)[None, :], acc)

    x = tl.load(x_ptr + rows[:, None] * x_s0 + cols_a[None, :] * x_s1, mask=xa_mask, other=0.0).to(ACC)
    if not NOISE_FROM_PTR:
        seed = tl.load(seed_ptr)
    tl.debug_barrier()  # sp scratch visible to every thread of the CTA

    for i in range(T):
        t = T - 1 - i
        # ---- layer 1: z1 = x W1x^T + sp + tb[t] -> mish -> buf0 ----
        xd = x.to(DT)
        for n0 in range(0, H, BN):
            c = n0 + cn
            w = w1x_desc.load([n0, 0])  # [BN, A_PAD]; pad columns are zero
            z = tl.dot(xd, w.T, input_precision=PREC, out_dtype=ACC)
            z += tl.load(sp_rows + c[None, :])
            z += tl.load(tb_ptr + t * H + c)[None, :]
            if TRAINING:
                tl.store(wsz_ptr + ((0 * T + t) * N + rows[:, None]) * H + c[None, :], z, mask=rmask[:, None])
            tl.store(buf0 + c[None, :], _mish(z).to(DT))
        tl.debug_barrier()
        # ---- layers 2 and 3: buf0 -> buf1 -> buf0 ----
        _dense_mish(buf0, w2_desc, b2_ptr, buf1, wsz_ptr, ((1 * T + t) * N + rows[:, None]) * H, rmask,
                    BM, H, BN, BK, TRAINING, ACC, PREC)
        tl.debug_barrier()
        _dense_mish(buf1, w3_desc, b3_ptr, buf0, wsz_ptr, ((2 * T + t) * N + rows[:, None]) * H, rmask,
                    BM, H, BN, BK, TRAINING, ACC, PREC)
        tl.debug_barrier()
        # ---- layer 4: eps [BM, A_PAD], K-chunked; pad columns are exactly 0 (masked W4 rows and b4) ----
        eps = tl.zeros((BM, A_PAD), dtype=ACC)
        for k0 in range(0, H, BK):
            kk = k0 + ck
            h = tl.load(buf0 + kk[None, :])
            w4 = w4_desc.load([0, k0])  # [A_PAD, BK]; pad rows are zero
            eps = tl.dot(h, w4.T, eps, input_precision=PREC, out_dtype=ACC)
        eps += tl.load(b4_ptr + cols_a, mask=amask, other=0.0).to(ACC)[None, :]
        tl.debug_barrier()  # buf0 is rewritten by the next step's layer 1

        # ---- DDPM posterior step in ACC precision ----
        sra = tl.load(coef_ptr + 0 * T + t)
        srm1 = tl.load(coef_ptr + 1 * T + t)
        c1 = tl.load(coef_ptr + 2 * T + t)
        c2 = tl.load(coef_ptr + 3 * T + t)
        std = tl.load(coef_ptr + 4 * T + t)
        if TRAINING:
            tl.store(wsx_ptr + (t * N + rows[:, None]) * A + cols_a[None, :], x, mask=xa_mask)
        x0 = sra * x - srm1 * eps
        if HAS_CLIP:  # NaN stays NaN, as in torch.clamp (tl.minimum/maximum would turn it into +-clip)
            x0 = tl.where(x0 != x0, x0, tl.minimum(tl.maximum(x0, -clip_val), clip_val))
        xn = c1 * x0 + c2 * x
        if FINAL_NOISE:
            nmask = xa_mask
        else:
            nmask = xa_mask & ((rows * 0 + t) > 0)[:, None]  # tensor compare: t may be a Python int
        if NOISE_FROM_PTR:
            # masked: noise[0] is never read without final noise, so it may hold anything (even NaN)
            zn = tl.load(noise_ptr + t * nz_s0 + rows[:, None] * nz_s1 + cols_a[None, :] * nz_s2,
                         mask=nmask, other=0.0).to(ACC)
        else:
            # Philox keyed by the device-resident seed; offsets are logical (row, t, col) indices, so a row's
            # stream depends neither on the block size/grid nor on how many rows the call has.
            offs = (rows[:, None] * T + t) * A + cols_a[None, :]
            zn = tl.where(nmask, tl.randn(seed, offs), 0.0).to(ACC)
        x = xn + std * zn

    tl.store(out_ptr + rows[:, None] * out_s0 + cols_a[None, :] * out_s1, x.to(out_ptr.dtype.element_ty),
             mask=xa_mask)


@triton.jit
def _chain_bwd_kernel(
    gout_ptr, go_s0, go_s1,  # [N, A] dL/dx_out
    w1x_desc,  # tensor descriptor over the zero-padded W1x [H, A_PAD] (block [BK, A_PAD])
    w2_desc,  # tensor descriptor over W2 [H, H] (block [BK, BN])
    w3_desc,
    w4k_desc,  # tensor descriptors over the zero-padded W4 [A_PAD, H]: blocks [A_PAD, BK] and [A_PAD, BN]
    w4n_desc,
    b4_ptr,
    coef_ptr,
    wsx_ptr,  # [T, N, A] x_t
    wsz_ptr,  # [3, T, N, H] z1..z3
    wsd_ptr,  # [3, T, N, H] out: d1..d3 = dL/dz1..z3
    wsd4_ptr,  # [T, N, A] out: d4 = dL/d eps
    dsp_ptr,  # [N, H] out: sum_t d1 = dL/d sp (zero-initialised)
    dx_ptr,  # [N, A] out: dL/dx_T
    N, A, T, clip_val,
    H: tl.constexpr, A_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_CLIP: tl.constexpr, ACC_FP64: tl.constexpr, PREC: tl.constexpr,
):
    DT = w2_desc.dtype
    ACC: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < N
    cols_a = tl.arange(0, A_PAD)
    amask = cols_a < A
    xa_mask = rmask[:, None] & amask[None, :]
    ck = tl.arange(0, BK)
    cn = tl.arange(0, BN)
    slab = tl.cast(T, tl.int64) * N * H  # int64: 3 * slab passes 2^31 at T=20, H=512 from N ~ 70k rows
    dsp_rows = dsp_ptr + rows[:, None] * H

    g = tl.load(gout_ptr + rows[:, None] * go_s0 + cols_a[None, :] * go_s1, mask=xa_mask, other=0.0).to(ACC)

    for t in range(T):  # sampling ran t = T-1 .. 0, so the gradient flows t = 0 .. T-1
        zrow = (t * N + rows[:, None]) * H  # [BM, 1] row offsets inside one [T, N, H] slab
        z1 = wsz_ptr + zrow
        z2 = wsz_ptr + slab + zrow
        z3 = wsz_ptr + 2 * slab + zrow
        d1 = wsd_ptr + zrow
        d2 = wsd_ptr + slab + zrow
        d3 = wsd_ptr + 2 * slab + zrow
        xin = tl.load(wsx_ptr + (t * N + rows[:, None]) * A + cols_a[None, :], mask=xa_mask, other=0.0)
        sra = tl.load(coef_ptr + 0 * T + t)
        srm1 = tl.load(coef_ptr + 1 * T + t)
        c1 = tl.load(coef_ptr + 2 * T + t)
        c2 = tl.load(coef_ptr + 3 * T + t)
        # x_out = c1 * clip(sra x - srm1 eps) + c2 x + std z  =>  g_x0 = c1 g * 1[|x0| <= clip]
        gx0 = c1 * g
        if HAS_CLIP:  # recompute eps = mish(z3) @ W4^T + b4 for the clip mask, K-chunked
            eps = tl.zeros((BM, A_PAD), dtype=ACC)
            for k0 in range(0, H, BK):
                kk = k0 + ck
                zk = tl.load(z3 + kk[None, :], mask=rmask[:, None], other=0.0)
                w4 = w4k_desc.load([0, k0])  # [A_PAD, BK]
                eps = tl.dot(_mish(zk).to(DT), w4.T, eps, input_precision=PREC, out_dtype=ACC)
            eps += tl.load(b4_ptr + cols_a, mask=amask, other=0.0).to(ACC)[None, :]
            x0 = sra * xin - srm1 * eps
            gx0 = tl.where((x0 >= -clip_val) & (x0 <= clip_val), gx0, 0.0)
        gx = c2 * g + sra * gx0
        d4 = -srm1 * gx0  # dL/d eps, [BM, A_PAD], zero in pad columns
        tl.store(wsd4_ptr + (t * N + rows[:, None]) * A + cols_a[None, :], d4, mask=xa_mask)
        # ---- layer 4 -> d3 = (d4 @ W4) * mish'(z3) ----
        d4d = d4.to(DT)
        for n0 in range(0, H, BN):
            c = n0 + cn
            w = w4n_desc.load([0, n0])  # [A_PAD, BN]
            z = tl.load(z3 + c[None, :], mask=rmask[:, None], other=0.0)
            d = tl.dot(d4d, w, input_precision=PREC, out_dtype=ACC) * _mish_grad(z)
            tl.store(d3 + c[None, :], d, mask=rmask[:, None])
        tl.debug_barrier()
        # ---- layer 3 -> d2 = (d3 @ W3) * mish'(z2); layer 2 -> d1 = (d2 @ W2) * mish'(z1) ----
        _dense_mish_backward(d3, w3_desc, z2, d2, rmask, DT, BM, H, BN, BK, ACC, PREC)
        tl.debug_barrier()
        _dense_mish_backward(d2, w2_desc, z1, d1, rmask, DT, BM, H, BN, BK, ACC, PREC)
        tl.debug_barrier()
        # ---- layer 1: dL/dsp += d1 (the state projection enters every step); dL/dx_t += d1 @ W1x ----
        for k0 in range(0, H, BK):
            kk = k0 + ck
            dk = tl.load(d1 + kk[None, :], mask=rmask[:, None], other=0.0)
            sp = dsp_rows + kk[None, :]
            tl.store(sp, tl.load(sp, mask=rmask[:, None], other=0.0) + dk, mask=rmask[:, None])
            w1x = w1x_desc.load([k0, 0])  # [BK, A_PAD]
            gx = tl.dot(dk.to(DT), w1x, gx, input_precision=PREC, out_dtype=ACC)
        g = gx

    tl.store(dx_ptr + rows[:, None] * A + cols_a[None, :], g, mask=xa_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Tests set this to a config dict to run the GPU tilings (or any other) through the interpreter.
_CONFIG_OVERRIDE: dict | None = None


def _config(N: int, H: int, dtype: torch.dtype, training: bool = False) -> dict:
    """Block sizes. Under the interpreter every tl op costs Python time per program, so blocks are larger there (fewer
    ops), but H is still split in two chunks so the chunk loops run more than once."""
    if _CONFIG_OVERRIDE is not None:
        return dict(_CONFIG_OVERRIDE)
    if _interpreting():
        c = max(16, H // 2)
        return {"BM": 16 if N <= 64 else 64, "BN": c, "BK": c, "num_warps": 4, "num_stages": 1}
    return _config_gpu(N, H, dtype, training)


def _config_gpu(N: int, H: int, dtype: torch.dtype, training: bool = False) -> dict:
    """GPU block sizes (kernels/README.md, "Tiling"). Every warp owns its own 16 rows (mma.sync m16) or its quarter of
    a 64-row warpgroup tile (wgmma m64): BM = 16 x num_warps. Large N (>= 4096) takes one warpgroup per 64 rows, which
    is what makes Triton emit wgmma; small N keeps one warp per 16 rows so the rows spread over as many SMs as
    possible (the chain is latency-bound there). Tile widths come from a compile_check sweep: the widest tried that
    compile without register spills for bf16 and fp32 operands (kernels/README.md, "Tiling")."""
    if N >= 4096:  # the backward kernel needs narrower tiles than the forward to stay spill-free
        bn, bk = (32, 16) if training else (64, 32)
        return {"BM": 64, "num_warps": 4, "BN": min(bn, H), "BK": min(bk, H), "num_stages": 3}
    bk = min(32 if dtype.itemsize <= 2 else 16, H)
    if N > 2048:
        return {"BM": 32, "num_warps": 2, "BN": 16, "BK": bk, "num_stages": 2}
    return {"BM": 16, "num_warps": 1, "BN": 16, "BK": bk, "num_stages": 2}


PRECISIONS = ("ieee", "tf32", "bf16")


def _resolve_precision(precision: str | None, wdtype: torch.dtype) -> tuple[str, torch.dtype, str]:
    """-> (name, dot operand dtype, tl.dot input_precision).

    None follows the weights: fp32 -> "tf32" if PyTorch's matmuls may use TF32 (torch.backends.cuda.matmul.allow_tf32)
    else "ieee"; bf16 -> "bf16"; fp16 -> "fp16"; fp64 -> "fp64". "ieee" keeps fp64 weights in fp64 (gradcheck), all
    others compute in fp32. The interpreter computes every fp32 dot exactly, so "tf32" there runs as "ieee"."""
    if precision is None:
        if wdtype == torch.float32:
            precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and not _interpreting() else "ieee"
        else:
            name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[wdtype]
            return name, wdtype, "ieee" if wdtype == torch.float64 else "tf32"
    if precision == "ieee":
        dt = torch.float64 if wdtype == torch.float64 else torch.float32
        return "ieee", dt, "ieee"
    if precision == "tf32":
        return "tf32", torch.float32, "ieee" if _interpreting() else "tf32"
    if precision == "bf16":
        return "bf16", torch.bfloat16, "tf32"  # input_precision is ignored for 16-bit operands
    _fail(f"precision must be one of {PRECISIONS} or None, got {precision!r}")


_COEF_CACHE: dict = {}


def _coef_table(betas: torch.Tensor, final_noise: bool, device, acc_dtype) -> torch.Tensor:
    """[5, T] coefficient table. Cached per betas tensor: recomputing it is ~15 small PyTorch ops (~100 us of CPU
    launch overhead on a GPU), more than the fused kernel itself at small batch. The cache keeps a reference to the
    betas tensor (so its storage cannot be recycled under the same id) and its version counter (in-place edits)."""
    key = (id(betas), str(device), acc_dtype, bool(final_noise))
    hit = _COEF_CACHE.get(key)
    if hit is not None and hit[0] is betas and hit[1] == betas._version:
        return hit[2]
    table = _compute_coef_table(betas, final_noise, device, acc_dtype)
    if len(_COEF_CACHE) >= 64:
        _COEF_CACHE.clear()
    _COEF_CACHE[key] = (betas, betas._version, table)
    return table


def _compute_coef_table(betas: torch.Tensor, final_noise: bool, device, acc_dtype) -> torch.Tensor:
    c = ddpm_coefficients(betas.detach().to(device))
    std = c["post_std"].clone()
    if not final_noise:
        std[0] = 0.0  # the kernel also masks the noise load at t = 0; this keeps 0 * anything out of the sum
    return torch.stack([c["sqrt_recip_ac"], c["sqrt_recipm1_ac"], c["c1"], c["c2"], std]).to(acc_dtype).contiguous()


def _tma_ready(w: torch.Tensor) -> torch.Tensor:
    """A tensor descriptor needs a unit last stride and 16-byte aligned base and row stride; weights that are not
    (strided views) are copied. Parameters are contiguous, so the scripts never pay for the copy."""
    if w.stride(1) == 1 and (w.stride(0) * w.element_size()) % 16 == 0 and w.data_ptr() % 16 == 0:
        return w
    return w.contiguous() if w.data_ptr() % 16 == 0 or not w.is_contiguous() else w.clone()


class _Problem:
    """Everything both kernels need, validated once per call."""

    def __init__(self, state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4, coef, noise, seed, clip, final_noise, prec,
                 training=False):
        self.N, self.S = state.shape
        self.A = x.shape[1]
        self.T, self.H = tb.shape
        self.dtype = w2.dtype
        self.acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.A_PAD = max(16, _next_pow2(self.A))  # >= 16: the K of layer 1 and N of layer 4 (GPU dot minimum)
        cfg = _config(self.N, self.H, self.dtype, training)
        self.cfg = cfg
        self.BM, self.BN, self.BK, self.num_warps = cfg["BM"], cfg["BN"], cfg["BK"], cfg["num_warps"]
        self.num_stages = cfg.get("num_stages", 3)
        assert self.A_PAD >= 16 and self.BK >= 16 and self.BN >= 16 and self.BM >= 16, "GPU tl.dot needs K >= 16"
        assert self.H % self.BN == 0 and self.H % self.BK == 0
        self.grid = (triton.cdiv(self.N, self.BM),)
        self.tensors = (state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4, coef, noise, seed)
        # Zero-padded copies of the two thin weights ([H, A_PAD] and [A_PAD, H], a few KiB): tensor descriptors need
        # 16-byte aligned rows (W1x is a column slice of W1), and the zero pad makes every tile load unmasked.
        with torch.no_grad():
            self.w1xp = torch.nn.functional.pad(w1x.detach(), (0, self.A_PAD - self.A)).contiguous()
            self.w4p = torch.nn.functional.pad(w4.detach(), (0, 0, 0, self.A_PAD - self.A)).contiguous()
        self.clip = clip
        self.final_noise = final_noise
        self.prec = prec


def _descriptor(w: torch.Tensor, block):
    return TensorDescriptor.from_tensor(_tma_ready(w), list(block))


def _forward_launch(p: _Problem, training: bool):
    """-> (grid, args, kwargs, out, workspaces) of the forward kernel: everything `_chain_fwd_kernel[grid](*args,
    **kwargs)` takes. kernels.compile_check compiles from exactly these arguments."""
    state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4, coef, noise, seed = p.tensors
    dev = x.device
    gbm = p.grid[0] * p.BM
    out = torch.empty(p.N, p.A, device=dev, dtype=x.dtype)
    hs = torch.empty(2, gbm, p.H, device=dev, dtype=p.dtype)
    sp = torch.empty(gbm, p.H, device=dev, dtype=p.acc)
    if training:
        wsx = torch.empty(p.T, p.N, p.A, device=dev, dtype=p.acc)
        wsz = torch.empty(3, p.T, p.N, p.H, device=dev, dtype=p.acc)
    else:
        wsx = wsz = sp  # never touched (TRAINING is a constexpr)
    from_ptr = noise is not None
    nz = noise if from_ptr else x
    nz_strides = noise.stride() if from_ptr else (0, 0, 0)
    sd = seed if seed is not None else coef
    args = (
        state, state.stride(0), state.stride(1),
        x, x.stride(0), x.stride(1),
        nz, *nz_strides,
        sd,
        tb,
        w1s, w1s.stride(0), w1s.stride(1),
        _descriptor(p.w1xp, (p.BN, p.A_PAD)),
        _descriptor(w2, (p.BN, p.BK)), b2,
        _descriptor(w3, (p.BN, p.BK)), b3,
        _descriptor(p.w4p, (p.A_PAD, p.BK)), b4,
        coef,
        out, out.stride(0), out.stride(1),
        hs, sp, wsx, wsz,
        p.N, p.S, p.A, p.T, float(p.clip if p.clip is not None else 0.0),
    )
    kw = dict(H=p.H, A_PAD=p.A_PAD, BM=p.BM, BN=p.BN, BK=p.BK,
              HAS_CLIP=p.clip is not None, FINAL_NOISE=bool(p.final_noise), NOISE_FROM_PTR=from_ptr,
              TRAINING=training, ACC_FP64=p.acc == torch.float64, PREC=p.prec, num_warps=p.num_warps,
              num_stages=p.num_stages)
    return p.grid, args, kw, out, ((wsx, wsz) if training else None)


def _forward(p: _Problem, training: bool):
    grid, args, kw, out, ws = _forward_launch(p, training)
    _chain_fwd_kernel[grid](*args, **kw)
    return out, ws


def _backward_launch(p: _Problem, gout: torch.Tensor, wsx: torch.Tensor, wsz: torch.Tensor):
    """-> (grid, args, kwargs, outputs) of the backward kernel (see `_forward_launch`)."""
    state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4, coef, noise, seed = p.tensors
    dev = gout.device
    wsd = torch.empty_like(wsz)
    wsd4 = torch.empty(p.T, p.N, p.A, device=dev, dtype=p.acc)
    dsp = torch.zeros(p.N, p.H, device=dev, dtype=p.acc)
    dx = torch.empty(p.N, p.A, device=dev, dtype=p.acc)
    args = (
        gout, gout.stride(0), gout.stride(1),
        _descriptor(p.w1xp, (p.BK, p.A_PAD)),
        _descriptor(w2, (p.BK, p.BN)),
        _descriptor(w3, (p.BK, p.BN)),
        _descriptor(p.w4p, (p.A_PAD, p.BK)),
        _descriptor(p.w4p, (p.A_PAD, p.BN)),
        b4,
        coef, wsx, wsz, wsd, wsd4, dsp, dx,
        p.N, p.A, p.T, float(p.clip if p.clip is not None else 0.0),
    )
    kw = dict(H=p.H, A_PAD=p.A_PAD, BM=p.BM, BN=p.BN, BK=p.BK, HAS_CLIP=p.clip is not None,
              ACC_FP64=p.acc == torch.float64, PREC=p.prec, num_warps=p.num_warps, num_stages=p.num_stages)
    return p.grid, args, kw, (wsd, wsd4, dsp, dx)


def _backward(p: _Problem, gout: torch.Tensor, wsx: torch.Tensor, wsz: torch.Tensor):
    grid, args, kw, outs = _backward_launch(p, gout, wsx, wsz)
    _chain_bwd_kernel[grid](*args, **kw)
    return outs


class _ReverseChainFn(torch.autograd.Function):
    """Differentiable fused chain. Inputs after `meta`: state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4 (the
    differentiable ones), then coef, noise, seed. W1s/W1x are views of W1 and tb is built from W1t, b1 and temb in
    PyTorch, so autograd assembles dW1, db1 and dtemb from the gradients returned here."""

    @staticmethod
    def forward(ctx, meta, state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4, coef, noise, seed):
        clip, final_noise, prec = meta
        p = _Problem(state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4, coef, noise, seed, clip, final_noise, prec,
                     training=True)
        out, (wsx, wsz) = _forward(p, training=True)
        ctx.problem = p
        p.tensors = None  # the backward rebuilds them from saved tensors (autograd's in-place version checks)
        ctx.save_for_backward(wsx, wsz, state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4, coef)
        return out

    @staticmethod
    def backward(ctx, gout):
        with torch.autocast(gout.device.type, enabled=False):  # the weight-gradient GEMMs stay fp32
            return _ReverseChainFn._backward(ctx, gout)

    @staticmethod
    def _backward(ctx, gout):
        p: _Problem = ctx.problem
        wsx, wsz, state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4, coef = ctx.saved_tensors
        p.tensors = (state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4, coef, None, None)
        wsd, wsd4, dsp, dx = _backward(p, gout.contiguous(), wsx, wsz)
        acc, H, A = p.acc, p.H, p.A
        need = ctx.needs_input_grad  # (meta, state, x, tb, w1s, w1x, w2, b2, w3, b3, w4, b4, ...)
        # Weight gradients: one GEMM per layer over the T*N rows (deterministic; cuBLAS on a GPU).
        d1, d2, d3 = (wsd[i].reshape(-1, H) for i in range(3))
        d4 = wsd4.reshape(-1, A)
        g = [None] * 14
        if need[1]:
            g[1] = (dsp @ w1s.to(acc)).to(state.dtype)
        if need[2]:
            g[2] = dx.to(x.dtype)
        if need[3]:
            g[3] = wsd[0].sum(1).to(tb.dtype)  # [T, H]: tb[t] is broadcast over the N rows of step t
        if need[4]:
            g[4] = (dsp.t() @ state.to(acc)).to(w1s.dtype)
        if need[5]:
            g[5] = (d1.t() @ wsx.reshape(-1, A)).to(w1x.dtype)
        if need[6] or need[7]:
            g[6] = (d2.t() @ torch.nn.functional.mish(wsz[0].reshape(-1, H))).to(w2.dtype)
            g[7] = d2.sum(0).to(b2.dtype)
        if need[8] or need[9]:
            g[8] = (d3.t() @ torch.nn.functional.mish(wsz[1].reshape(-1, H))).to(w3.dtype)
            g[9] = d3.sum(0).to(b3.dtype)
        if need[10] or need[11]:
            g[10] = (d4.t() @ torch.nn.functional.mish(wsz[2].reshape(-1, H))).to(w4.dtype)
            g[11] = d4.sum(0).to(b4.dtype)
        return tuple(g) + (None,)  # meta .. seed: 15 inputs


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------
def _fail(msg: str):
    raise ValueError(f"kernels.reverse_chain: {msg}")


def reverse_chain(layers, state, x, temb, betas, order, noise=None, seed=None, clip=1.0, final_noise=False,
                  precision=None):
    """Runs the T-step DDPM reverse chain t = T-1 .. 0 of a 4-layer Mish MLP denoiser in one fused Triton launch.

    layers: 4 x (weight [out, in], bias [out]), in -> H -> H -> H -> A; state [N, S]; x [N, A] = x_T; temb [T, E];
    betas [T]; order "sxt" (cat[state, x_t, temb]) or "xts" (cat[x_t, temb, state]); noise [T, N, A] or None (then
    `seed`, an int64 device tensor, drives in-kernel Philox normals); clip: x0-hat clip or None; final_noise: add
    post_std[0] * noise[0] at the last step; precision: "ieee" (fp32 operands, IEEE dots), "tf32" (fp32 operands,
    TF32 dots), "bf16" (bf16 operands) -- accumulation and the DDPM state are fp32 in all three -- or None (follow the
    weights' dtype, see `_resolve_precision`). Weights are cast to the operand dtype (a differentiable cast), biases
    are read in fp32. Returns [N, A] (not clipped). Differentiable w.r.t. layers, state, x and temb when any of them
    requires grad and grad mode is on.
    """
    if order not in ORDERS:
        _fail(f"order must be one of {ORDERS}, got {order!r}")
    if len(layers) != 4:
        _fail(f"expected 4 (weight, bias) layers, got {len(layers)}")
    (W1, b1), (W2, b2), (W3, b3), (W4, b4) = layers
    if state.dim() != 2 or x.dim() != 2 or temb.dim() != 2 or state.shape[0] != x.shape[0]:
        _fail(f"shapes: state {tuple(state.shape)} and x {tuple(x.shape)} must be [N, S] and [N, A], "
              f"temb {tuple(temb.shape)} must be [T, E]")
    N, S = state.shape
    A = x.shape[1]
    T, E = temb.shape
    H = W1.shape[0]
    if tuple(W1.shape) != (H, S + A + E) or tuple(W2.shape) != (H, H) or tuple(W3.shape) != (H, H) \
            or tuple(W4.shape) != (A, H):
        _fail(f"layer shapes {[tuple(w.shape) for w, _ in layers]} do not fit S={S}, A={A}, E={E}")
    if H < 16 or H & (H - 1):
        _fail(f"hidden width must be a power of two >= 16, got {H}")
    if betas.shape != (T,):
        _fail(f"betas has shape {tuple(betas.shape)}, expected ({T},) to match temb")
    dtype = W2.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        _fail(f"unsupported weight dtype {dtype}")
    if any(t.dtype != dtype for pair in layers for t in pair):
        _fail("all layer weights and biases must share one dtype")
    name, cdtype, prec = _resolve_precision(precision, dtype)
    dev = x.device
    if dev.type == "cpu" and not _interpreting():
        _fail("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton/kernels")
    if cdtype == torch.bfloat16 and _interpreting():
        _fail("bf16 is computed wrongly by Triton's interpreter; use precision 'ieee' or 'tf32' on CPU, "
              "'bf16' on a GPU")
    if noise is None:
        if seed is None or not torch.is_tensor(seed) or seed.numel() != 1 or seed.dtype != torch.int64:
            _fail("noise=None needs seed= a one-element int64 tensor on the device")
        seed = seed.reshape(1).to(dev)
    else:
        if tuple(noise.shape) != (T, N, A):
            _fail(f"noise has shape {tuple(noise.shape)}, expected {(T, N, A)}")
        noise = noise.detach()
        seed = None
    if N == 0:
        return x.new_zeros(0, A)

    # An enclosing autocast must not re-type the PyTorch side (time-bias table, casts, weight-gradient GEMMs):
    # `precision` alone decides the operand dtype.
    with torch.autocast(dev.type, enabled=False):
        args, coef = _prepare(layers, cdtype, state, x, temb, betas, order, final_noise)
        if torch.is_grad_enabled() and any(t.requires_grad for t in args):
            return _ReverseChainFn.apply((clip, final_noise, prec), *args, coef, noise, seed)
        p = _Problem(*(t.detach() for t in args), coef, noise, seed, clip, final_noise, prec)
        return _forward(p, training=False)[0]


def _prepare(layers, cdtype, state, x, temb, betas, order, final_noise):
    """-> the kernel-side tensors (state, x, tb, W1s, W1x, W2, b2, W3, b3, W4, b4) and the coefficient table."""
    (W1, b1), (W2, b2), (W3, b3), (W4, b4) = layers
    S, A, E = state.shape[1], x.shape[1], temb.shape[1]
    acc = torch.float64 if cdtype == torch.float64 else torch.float32
    if W2.dtype != cdtype:  # differentiable casts: autograd takes the gradients back to the caller's dtype
        W1, W2, W3, W4 = (w.to(cdtype) for w in (W1, W2, W3, W4))
    if order == "sxt":
        W1s, W1x, W1t = W1[:, :S], W1[:, S:S + A], W1[:, S + A:]
    else:
        W1x, W1t, W1s = W1[:, :A], W1[:, A:A + E], W1[:, A + E:]
    # [T, H] time-bias table, in PyTorch so autograd owns its gradient (temb, W1t, b1).
    tb = torch.addmm(b1.to(acc), temb.to(acc), W1t.to(acc).t()).contiguous()
    coef = _coef_table(betas, final_noise, x.device, acc)
    b2, b3, b4 = b2.contiguous(), b3.contiguous(), b4.contiguous()  # the kernels read biases with unit stride
    return (state, x, tb, W1s, W1x, W2, b2, W3, b3, W4, b4), coef
