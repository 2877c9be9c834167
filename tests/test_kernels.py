"""Tests for kernels/: the fused reverse-chain Triton kernels against the plain-PyTorch reference.

On a CPU machine everything runs through Triton's interpreter (TRITON_INTERPRET=1, set by the root conftest.py), so
shapes are small; the odd dims of the brief (S = 348, A = 17, temb 32, hidden 512) appear with tiny batches.
Tolerances: fp32 kernels are held to the flash-attention ratio rule against an fp64 reference
(error <= 2x the error of the same chain run by PyTorch in fp32, + 1e-5), fp16 likewise against PyTorch's fp16 chain.
GPU-only checks (bf16, the compiled kernel) are skipped without CUDA.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels.reference import (SCHEDULES, cosine_betas, ddpm_coefficients, linear_betas, make_layers, mlp_forward,
                               reverse_chain_reference, vp_betas)
from helpers import REPO, read_summary, run_dirs, run_script

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: bf16 and compiled Triton cannot be checked in the "
                                                "CPU interpreter")


def _problem(S, A, E, H, T, N, sched="vp", dtype=torch.float32, seed=0, wscale=1.0, xscale=0.5):
    g = torch.Generator().manual_seed(seed)
    layers = make_layers(S, A, E, H, dtype=torch.float64, generator=g, scale=wscale)
    state = torch.randn(N, S, generator=g, dtype=torch.float64)
    x = xscale * torch.randn(N, A, generator=g, dtype=torch.float64)
    temb = torch.randn(T, E, generator=g, dtype=torch.float64)
    noise = torch.randn(T, N, A, generator=g, dtype=torch.float64)
    betas = SCHEDULES[sched](T)
    return layers, state, x, temb, noise, betas


def _cast(layers, *ts, dtype, device=DEV):
    return [(w.to(device, dtype), b.to(device, dtype)) for w, b in layers], [t.to(device, dtype) for t in ts]


def _ratio_check(out, ref64, ref_lowp, slack):
    """flash-attention rule: |out - ref64| <= 2 |ref_lowp - ref64| + slack, elementwise max; no NaN."""
    out, ref64, ref_lowp = out.double().cpu(), ref64.double().cpu(), ref_lowp.double().cpu()
    assert torch.isfinite(out).all()
    err = (out - ref64).abs().max().item()
    bound = 2 * (ref_lowp - ref64).abs().max().item() + slack
    assert err <= bound, f"kernel error {err:.3e} > bound {bound:.3e}"
    return err


# ----------------------------------------------------------------------------------------------------------------------
# Reference and schedules
# ----------------------------------------------------------------------------------------------------------------------
def test_schedules_match_the_official_formulas():
    lin = linear_betas(20)
    assert lin[0].item() == pytest.approx(0.8e-4) and lin[-1].item() == pytest.approx(0.8 * 0.999)
    vp = vp_betas(5)
    t = torch.arange(1, 6, dtype=torch.float64)
    assert torch.allclose(vp, 1 - torch.exp(-0.1 / 5 - 0.5 * 9.9 * (2 * t - 1) / 25))
    cos = cosine_betas(20)  # online_algorithms.md §3.2: beta_1 = 0.008, beta_19 = 0.749, beta_20 = 0.999
    assert cos[0].item() == pytest.approx(0.008, abs=5e-4) and cos[18].item() == pytest.approx(0.749, abs=1e-3)
    assert cos[19].item() == pytest.approx(0.999)
    c = ddpm_coefficients(vp)
    # at t = 0: ac_prev = 1, so the posterior mean is x0 itself (c1 = 1, c2 = 0) and the variance is clamped
    assert c["c1"][0].item() == pytest.approx(1.0) and c["c2"][0].item() == pytest.approx(0.0, abs=1e-12)
    assert c["post_std"][0].item() == pytest.approx(1e-10)


def test_reference_mlp_matches_nn_modules():
    S, A, E, H = 5, 3, 4, 16
    for order in ("sxt", "xts"):
        net = torch.nn.Sequential(torch.nn.Linear(S + A + E, H), torch.nn.Mish(), torch.nn.Linear(H, H),
                                  torch.nn.Mish(), torch.nn.Linear(H, H), torch.nn.Mish(), torch.nn.Linear(H, A))
        layers = [(m.weight, m.bias) for m in net if isinstance(m, torch.nn.Linear)]
        s, x, te = torch.randn(7, S), torch.randn(7, A), torch.randn(E)
        inp = torch.cat([s, x, te.expand(7, E)] if order == "sxt" else [x, te.expand(7, E), s], 1)
        torch.testing.assert_close(mlp_forward(layers, s, x, te, order), net(inp))


# ----------------------------------------------------------------------------------------------------------------------
# Forward parity (interpreter on CPU, compiled on GPU)
# ----------------------------------------------------------------------------------------------------------------------
FWD_CASES = [
    # order, S, A, E, H, T, schedule, N, clip        (which script it stands for)
    ("sxt", 17, 6, 16, 32, 20, "linear", 21, 1.0),  # SDAC, batch not a multiple of the block
    ("xts", 17, 6, 16, 64, 5, "vp", 37, 1.0),  # Diffusion-QL
    ("sxt", 348, 17, 16, 32, 5, "vp", 5, 1.0),  # DACER on Humanoid dims (S=348 > 256, A=17 -> A_PAD=32)
    ("xts", 11, 3, 32, 64, 20, "cosine", 20, 1.0),  # QVPO: temb 32, cosine with beta_T = 0.999
    ("sxt", 11, 1, 16, 256, 5, "vp", 17, None),  # hidden 256, A=1, no clip
    ("xts", 27, 8, 16, 512, 5, "linear", 3, 2.0),  # hidden 512 (DACER Humanoid width)
]


@pytest.mark.parametrize("order,S,A,E,H,T,sched,N,clip", FWD_CASES)
def test_forward_matches_reference_fp32(order, S, A, E, H, T, sched, N, clip):
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, sched)
    ref64 = reverse_chain_reference(layers, state, x, temb, betas, order, noise=noise, clip=clip)
    l32, (s32, x32, t32, n32) = _cast(layers, state, x, temb, noise, dtype=torch.float32)
    ref32 = reverse_chain_reference(l32, s32, x32, t32, betas, order, noise=n32, clip=clip)
    out = kernels.reverse_chain(l32, s32, x32, t32, betas, order, noise=n32, clip=clip)
    assert out.shape == (N, A) and out.dtype == torch.float32
    _ratio_check(out, ref64, ref32, slack=1e-5)
    if clip is not None:  # not vacuous: most outputs are not sitting on the clip bound
        assert (out.abs() < 0.999 * clip).float().mean() > 0.5


@pytest.mark.parametrize("order,S,A,E,H,T,sched,N,clip", [FWD_CASES[0], FWD_CASES[3]])
def test_forward_matches_reference_fp16(order, S, A, E, H, T, sched, N, clip):
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, sched)
    # The truth is the fp64 chain of the fp16-rounded weights; the low-precision yardstick is PyTorch's fp16 chain.
    l16, (s16, x16, t16, n16) = _cast(layers, state, x, temb, noise, dtype=torch.float16, device="cpu")
    l64 = [(w.double(), b.double()) for w, b in l16]
    ref64 = reverse_chain_reference(l64, state, x, temb, betas, order, noise=noise, clip=clip)
    ref16 = reverse_chain_reference(l16, s16, x16, t16, betas, order, noise=n16, clip=clip)
    lk = [(w.to(DEV), b.to(DEV)) for w, b in l16]
    _, (sk, xk, tk, nk) = _cast(layers, state, x, temb, noise, dtype=torch.float32)
    out = kernels.reverse_chain(lk, sk, xk, tk, betas, order, noise=nk, clip=clip)
    err = _ratio_check(out, ref64, ref16, slack=1e-3)
    assert err < 2e-2


def test_final_noise_and_fp64():
    layers, state, x, temb, noise, betas = _problem(9, 4, 16, 32, 5, 19, "vp")
    ref = reverse_chain_reference(layers, state, x, temb, betas, "sxt", noise=noise, clip=1.0, final_noise=True)
    l64, (s, xx, te, nz) = _cast(layers, state, x, temb, noise, dtype=torch.float64)
    out = kernels.reverse_chain(l64, s, xx, te, betas, "sxt", noise=nz, clip=1.0, final_noise=True)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-10)
    # without final noise the output differs by exactly the (tiny, std_0 = 1e-10) last noise term
    out0 = kernels.reverse_chain(l64, s, xx, te, betas, "sxt", noise=nz, clip=1.0, final_noise=False)
    torch.testing.assert_close((out - out0).cpu(), 1e-10 * noise[0], rtol=1e-6, atol=1e-14)


def test_nan_poisoned_memory_beyond_the_valid_region():
    """Every input is a strided view into a larger NaN-filled buffer, and noise[0] (unused) is NaN: no NaN may leak."""
    order, S, A, E, H, T, N = "xts", 13, 5, 16, 32, 5, 21
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, "cosine")
    ref = reverse_chain_reference(layers, state, x, temb, betas, order, noise=noise, clip=1.0)

    def poisoned(t):
        big = torch.full([d + 3 for d in t.shape], float("nan"), dtype=torch.float32, device=DEV)
        view = big[tuple(slice(1, 1 + d) for d in t.shape)]
        view.copy_(t)
        return view

    lk = [(poisoned(w), poisoned(b)) for w, b in layers]
    nz = poisoned(noise)
    nz[0] = float("nan")
    out = kernels.reverse_chain(lk, poisoned(state), poisoned(x), poisoned(temb), betas, order, noise=nz, clip=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-5)
    # and the gradient path reads the same views
    lg = [(w.detach().requires_grad_(), b.detach().requires_grad_()) for w, b in lk]
    st = poisoned(state).requires_grad_()
    kernels.reverse_chain(lg, st, poisoned(x), poisoned(temb), betas, order, noise=nz, clip=1.0).sum().backward()
    assert all(torch.isfinite(p.grad).all() for pair in lg for p in pair) and torch.isfinite(st.grad).all()


def test_strided_biases_and_nan_inputs_behave_like_pytorch():
    """Every-other-element views of the biases give the reference result; a NaN state row stays NaN through the clip
    (as torch.clamp keeps it) instead of turning into a finite +-clip action, and the other rows are unaffected."""
    order, S, A, E, H, T, N = "sxt", 7, 3, 16, 32, 4, 9
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, "linear")
    ref = reverse_chain_reference(layers, state, x, temb, betas, order, noise=noise, clip=1.0)
    strided = [(w.float().to(DEV), b.float().repeat_interleave(2)[::2].to(DEV)) for w, b in layers]
    assert strided[1][1].stride() == (2,)
    _, (s, xx, te, nz) = _cast(layers, state, x, temb, noise, dtype=torch.float32)
    out = kernels.reverse_chain(strided, s, xx, te, betas, order, noise=nz, clip=1.0)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-5)
    s[2] = float("nan")
    out = kernels.reverse_chain(strided, s, xx, te, betas, order, noise=nz, clip=1.0).cpu()
    assert out[2].isnan().all() and torch.isfinite(out[torch.arange(N) != 2]).all()


def test_grad_mode_and_inference_paths_agree():
    layers, state, x, temb, noise, betas = _problem(6, 2, 16, 32, 3, 10, "linear")
    lk, (s, xx, te, nz) = _cast(layers, state, x, temb, noise, dtype=torch.float32)
    with torch.no_grad():
        a = kernels.reverse_chain(lk, s, xx, te, betas, "sxt", noise=nz)
    xx.requires_grad_()
    b = kernels.reverse_chain(lk, s, xx, te, betas, "sxt", noise=nz)
    assert b.requires_grad and not a.requires_grad
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# In-kernel RNG
# ----------------------------------------------------------------------------------------------------------------------
def test_in_kernel_rng_statistics_and_reproducibility():
    """Zero weights make eps = 0, so without clipping the chain is linear-Gaussian: x <- k_t x + std_t z with
    k_t = c1_t sra_t + c2_t. From x_T = 0 the output is N(0, v) with v = sum over steps of std_t^2 * prod of later k^2."""
    S, A, E, H, T, N = 3, 16, 16, 16, 3, 640
    betas = linear_betas(T)
    zero = [(torch.zeros(o, i, device=DEV), torch.zeros(o, device=DEV)) for i, o in
            [(S + A + E, H), (H, H), (H, H), (H, A)]]
    state = torch.randn(N, S, device=DEV)
    x = torch.zeros(N, A, device=DEV)
    temb = torch.randn(T, E, device=DEV)
    seed = torch.tensor([1234], dtype=torch.int64, device=DEV)
    out = kernels.reverse_chain(zero, state, x, temb, betas, "sxt", seed=seed, clip=None).double().cpu()
    c = ddpm_coefficients(betas)
    var = 0.0
    for t in range(T - 1, -1, -1):
        k = (c["c1"][t] * c["sqrt_recip_ac"][t] + c["c2"][t]).item()
        var = k * k * var + (c["post_std"][t].item() ** 2 if t > 0 else 0.0)
    n = out.numel()
    assert abs(out.mean().item()) < 4 * math.sqrt(var / n)
    assert out.std().item() == pytest.approx(math.sqrt(var), rel=0.03)
    # Gaussian shape: ~68.3% within one std
    assert (out.abs() < math.sqrt(var)).double().mean().item() == pytest.approx(0.6827, abs=0.02)
    # neighbouring columns and rows are uncorrelated
    assert abs(torch.corrcoef(torch.stack([out[:, 0], out[:, 1]]))[0, 1].item()) < 0.1
    assert abs(torch.corrcoef(torch.stack([out[:-1, 0], out[1:, 0]]))[0, 1].item()) < 0.1
    again = kernels.reverse_chain(zero, state, x, temb, betas, "sxt", seed=seed.clone(), clip=None).double().cpu()
    assert torch.equal(out, again)
    other = kernels.reverse_chain(zero, state, x, temb, betas, "sxt", seed=seed + 1, clip=None).double().cpu()
    assert not torch.allclose(out, other)
    # the stream is keyed by logical (t, row, col) indices: the first rows do not depend on N (grid/block size)
    head = kernels.reverse_chain(zero, state[:7], x[:7], temb, betas, "sxt", seed=seed, clip=None).double().cpu()
    assert torch.equal(head, out[:7])


# ----------------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order,clip,sched", [("sxt", None, "vp"), ("xts", 1.0, "cosine")])
def test_gradcheck_fp64(order, clip, sched):
    S, A, E, H, T, N = 5, 3, 4, 16, 3, 5
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, sched, wscale=2.0, xscale=1.0)
    flat = [t.to(DEV).requires_grad_() for pair in layers for t in pair]
    inputs = [state.to(DEV).requires_grad_(), x.to(DEV).requires_grad_(), temb.to(DEV).requires_grad_()]
    nz = noise.to(DEV)

    def f(s, xx, te, *fl):
        return kernels.reverse_chain([(fl[2 * i], fl[2 * i + 1]) for i in range(4)], s, xx, te, betas, order,
                                     noise=nz, clip=clip)

    assert torch.autograd.gradcheck(f, (*inputs, *flat), fast_mode=True)
    # and the full gradient equals PyTorch autograd through the reference chain
    out = f(*inputs, *flat)
    ref = reverse_chain_reference([(flat[2 * i], flat[2 * i + 1]) for i in range(4)], *inputs, betas, order,
                                  noise=nz, clip=clip)
    go = torch.randn_like(out)
    g_k = torch.autograd.grad(out, inputs + flat, go)
    g_r = torch.autograd.grad(ref, inputs + flat, go)
    for a, b in zip(g_k, g_r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_backward_fp32_matches_reference_on_odd_dims():
    """DACER-like training path in fp32: S=348, A=17, T=5, batch not a multiple of the block; grads of everything."""
    order, S, A, E, H, T, N = "sxt", 348, 17, 16, 32, 5, 19
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, "vp")
    grads = {}
    for name, dt in (("k", torch.float32), ("r", torch.float64)):
        lk, ts = _cast(layers, state, x, temb, noise, dtype=dt)
        params = [t.requires_grad_() for pair in lk for t in pair] + [t.requires_grad_() for t in ts[:3]]
        fn = kernels.reverse_chain if name == "k" else reverse_chain_reference
        out = fn(lk, *ts[:3], betas, order, noise=ts[3], clip=1.0)
        (out * torch.linspace(-1, 1, A, device=DEV, dtype=dt)).sum().backward()
        grads[name] = [p.grad.double().cpu() for p in params]
    for a, b in zip(grads["k"], grads["r"]):
        assert torch.isfinite(a).all()
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# API errors
# ----------------------------------------------------------------------------------------------------------------------
def test_bad_input_gives_actionable_errors():
    layers, state, x, temb, noise, betas = _problem(4, 2, 16, 16, 3, 5)
    lk, (s, xx, te, nz) = _cast(layers, state, x, temb, noise, dtype=torch.float32)
    with pytest.raises(ValueError, match="order"):
        kernels.reverse_chain(lk, s, xx, te, betas, "txs", noise=nz)
    with pytest.raises(ValueError, match="noise has shape"):
        kernels.reverse_chain(lk, s, xx, te, betas, "sxt", noise=nz[:2])
    with pytest.raises(ValueError, match="seed"):
        kernels.reverse_chain(lk, s, xx, te, betas, "sxt")
    with pytest.raises(ValueError, match="layer shapes"):
        kernels.reverse_chain(lk, s[:, :3], xx, te, betas, "sxt", noise=nz)
    if not CUDA:
        lb = [(w.bfloat16(), b.bfloat16()) for w, b in lk]
        with pytest.raises(ValueError, match="bf16"):
            kernels.reverse_chain(lb, s, xx, te, betas, "sxt", noise=nz)


def test_import_works_without_gpu_in_a_fresh_process():
    code = "import kernels, sys; assert callable(kernels.reverse_chain); print('ok')"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # kernels/ must decide on its own
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark (runs at tiny sizes; no timing asserts)
# ----------------------------------------------------------------------------------------------------------------------
def test_bench_tiny_prints_one_table():
    proc = subprocess.run([sys.executable, "-m", "kernels.bench", "--tiny"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for col in ("gpu us", "wall us", "max err", "| loop ", "| fused "):
        assert col in out.lower(), out
    assert "sample" in out and "train" in out
    rows = [line for line in out.splitlines() if line.startswith("| sample") or line.startswith("| train")]
    assert len(rows) == 4, out
    for row in rows:  # the error column holds numbers, and they are small (fp32 vs fp64 of the same network)
        errs = [float(v) for v in row.split("|")[-2].split("/")]
        assert all(e < 1e-5 for e in errs), row


def test_bench_error_column_reports_a_planted_difference():
    from kernels import bench

    ref_out, ref_g = torch.zeros(3, 2, dtype=torch.float64), [torch.ones(4, dtype=torch.float64)]
    assert bench.errors((ref_out.float(), None), (ref_out, None)) == "0.0e+00"
    planted = ref_out.clone()
    planted[1, 1] = 2.5e-3
    assert bench.errors((planted, None), (ref_out, None)) == "2.5e-03"
    g = [torch.tensor([1.0, 1.0, 1.0, 1.2])]  # relative L2 error 0.2 / 2 = 0.1
    assert bench.errors((ref_out, g), (ref_out, ref_g)) == "0.0e+00 / 1.0e-01"


@pytest.mark.parametrize("script,order", [("sdac", "sxt"), ("diffusion_ql", "xts")])
def test_bench_loop_is_the_scripts_own_pytorch_chain(script, order):
    """kernels.bench's baseline must be the scripts' `backend="torch"` chain, not a naive cat + Linear loop."""
    mod = pytest.importorskip(script)
    from kernels import bench

    torch.manual_seed(0)
    S, A, T, N = 7, 3, 4, 9
    den = mod.Denoiser(S, A, 32, 16, T)
    betas = linear_betas(T) if script == "sdac" else vp_betas(T)
    sched = mod.DDPMSchedule(betas, torch.device("cpu"))
    obs, x, noise = torch.randn(N, S), torch.randn(N, A), torch.randn(T, N, A)
    with torch.no_grad():
        want = mod.reverse_chain(den, sched, obs, x, noise, backend="torch")
        temb = den.time_mlp(den.time_features)
        layers = [(m.weight, m.bias) for m in den.net if isinstance(m, torch.nn.Linear)]
        c = ddpm_coefficients(betas)
        steps = list(zip(*(c[k].tolist() for k in ("sqrt_recip_ac", "sqrt_recipm1_ac", "c1", "c2", "post_std"))))
        got = bench.torch_chain(layers, obs, x, temb, steps, noise, order)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gpu_check_dry_runs_its_plumbing_on_cpu():
    proc = subprocess.run([sys.executable, "-m", "kernels.gpu_check", "--dry"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ieee") or line.startswith("| tf32")]
    assert len(rows) == 4, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        fused, loop = cells[8], cells[9]
        assert all(float(v) < 1e-5 for v in fused.split("/") + loop.split("/")), row


# ----------------------------------------------------------------------------------------------------------------------
# Tilings, precisions, auto choice
# ----------------------------------------------------------------------------------------------------------------------
GPU_CONFIGS = sorted({tuple(sorted(kernels.chain._config_gpu(n, 64, dt, tr).items()))
                      for n in (16, 3000, 16384) for dt in (torch.float32, torch.bfloat16) for tr in (False, True)})


@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c))
def test_gpu_tilings_in_the_interpreter(cfg, monkeypatch):
    """Every block configuration the GPU uses (BM/warps per N class, BN/BK per dtype), forced onto the interpreter:
    forward in fp32 (ratio rule) and the backward in fp64 against autograd through the reference. N is not a multiple
    of BM, and H = 64 gives several chunks in both loops."""
    monkeypatch.setattr(kernels.chain, "_CONFIG_OVERRIDE", dict(cfg))
    order, S, A, E, H, T, N = "xts", 9, 3, 16, 64, 3, 37
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, "vp")
    ref64 = reverse_chain_reference(layers, state, x, temb, betas, order, noise=noise, clip=1.0)
    l32, (s32, x32, t32, n32) = _cast(layers, state, x, temb, noise, dtype=torch.float32)
    ref32 = reverse_chain_reference(l32, s32, x32, t32, betas, order, noise=n32, clip=1.0)
    _ratio_check(kernels.reverse_chain(l32, s32, x32, t32, betas, order, noise=n32, clip=1.0), ref64, ref32, 1e-5)
    flat = [t.clone().requires_grad_() for pair in layers for t in pair]
    pairs = [(flat[2 * i], flat[2 * i + 1]) for i in range(4)]
    go = torch.randn(N, A, dtype=torch.float64)
    g_k = torch.autograd.grad(kernels.reverse_chain(pairs, state, x, temb, betas, order, noise=noise), flat, go)
    g_r = torch.autograd.grad(reverse_chain_reference(pairs, state, x, temb, betas, order, noise=noise), flat, go)
    for a, b in zip(g_k, g_r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_precision_paths_on_the_interpreter():
    """"ieee" casts other weight dtypes to fp32; "tf32" runs as exact fp32 on the interpreter (documented fallback: it
    has no TF32); "bf16" is refused there (the interpreter computes bf16 wrongly); anything else is an error."""
    order, S, A, E, H, T, N = "sxt", 6, 2, 16, 32, 3, 11
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, "linear")
    l32, (s, xx, te, nz) = _cast(layers, state, x, temb, noise, dtype=torch.float32)
    base = kernels.reverse_chain(l32, s, xx, te, betas, order, noise=nz)
    torch.testing.assert_close(kernels.reverse_chain(l32, s, xx, te, betas, order, noise=nz, precision="ieee"), base,
                               rtol=0, atol=0)
    if not CUDA:
        torch.testing.assert_close(kernels.reverse_chain(l32, s, xx, te, betas, order, noise=nz, precision="tf32"),
                                   base, rtol=0, atol=0)
        with pytest.raises(ValueError, match="bf16"):
            kernels.reverse_chain(l32, s, xx, te, betas, order, noise=nz, precision="bf16")
    # fp16 weights with precision "ieee": computed from the fp16 values in fp32, gradients come back in fp16
    l16 = [(w.half().requires_grad_(), b.half().requires_grad_()) for w, b in l32]
    out = kernels.reverse_chain(l16, s, xx, te, betas, order, noise=nz, precision="ieee")
    ref = reverse_chain_reference([(w.detach().double(), b.detach().double()) for w, b in l16], s.double(),
                                  xx.double(), te.double(), betas, order, noise=nz.double())
    assert (out.double() - ref).abs().max() < 1e-5
    out.sum().backward()
    assert l16[1][0].grad.dtype == torch.float16 and torch.isfinite(l16[1][0].grad.float()).all()
    with pytest.raises(ValueError, match="precision"):
        kernels.reverse_chain(l32, s, xx, te, betas, order, noise=nz, precision="fp8")


def test_prefer_triton_needs_a_recorded_gpu_measurement(monkeypatch):
    from kernels import measured

    cuda = torch.device("cuda")
    assert measured.MEASURED == []  # nothing measured on a GPU yet: auto is PyTorch everywhere
    monkeypatch.setattr(measured, "_device_name", lambda d: "NVIDIA H100 80GB HBM3")
    assert not kernels.prefer_triton(cuda, 256, "tf32")
    assert not kernels.prefer_triton(torch.device("cpu"), 256, "tf32")
    monkeypatch.setattr(measured, "MEASURED", [{"device": "NVIDIA H100 80GB HBM3", "hidden": 256, "precision": "tf32",
                                                "speedup": 1.8, "date": "2026-01-01", "command": "gpu_check"},
                                               {"device": "NVIDIA H100 80GB HBM3", "hidden": 512, "precision": "bf16",
                                                "speedup": 0.7, "date": "2026-01-01", "command": "gpu_check"}])
    assert kernels.prefer_triton(cuda, 256, "tf32")
    assert kernels.prefer_triton("cuda:0", 256, "tf32")
    assert not kernels.prefer_triton(cuda, 512, "tf32")  # other width
    assert not kernels.prefer_triton(cuda, 256, "bf16")  # other precision
    assert not kernels.prefer_triton(cuda, 512, "bf16")  # measured, but slower
    assert not kernels.prefer_triton(torch.device("cpu"), 256, "tf32")
    monkeypatch.setattr(measured, "_device_name", lambda d: "NVIDIA A100-SXM4-80GB")
    assert not kernels.prefer_triton(cuda, 256, "tf32")  # other GPU model


def test_compile_check_bf16_zero_spills_and_wgmma_for_large_batches():
    """The sm_90 compile at the JIT's specialization (no GPU needed): QVPO's two call shapes in bf16 at H 256 compile
    without spilling, the 16 384-row call with wgmma and the 4-row call with mma.sync."""
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--precision", "bf16", "--hidden", "256",
                           "--only", "qvpo"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 14 and cells[0].isdigit():
            rows[int(cells[5])] = cells
    assert set(rows) == {4, 16384}, proc.stdout
    for n, cells in rows.items():
        assert cells[10] == "0" and cells[11] == "0", cells  # spill stores, stack frame
        assert cells[13].startswith("0 /"), cells  # no per-element pointer/index tensor live across the step loop
        assert cells[14].startswith("wgmma" if n == 16384 else "mma.sync"), cells


# ----------------------------------------------------------------------------------------------------------------------
# GPU-only
# ----------------------------------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("order,S,A,E,H,T,sched,N,clip", [FWD_CASES[0], FWD_CASES[4], FWD_CASES[5]])
def test_gpu_bf16_forward_ratio_rule(order, S, A, E, H, T, sched, N, clip):
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, sched)
    lb, (sb, xb, tb, nb) = _cast(layers, state, x, temb, noise, dtype=torch.bfloat16)
    l64 = [(w.double().cpu(), b.double().cpu()) for w, b in lb]
    ref64 = reverse_chain_reference(l64, state, x, temb, betas, order, noise=noise, clip=clip)
    ref_bf = reverse_chain_reference(lb, sb, xb, tb, betas, order, noise=nb, clip=clip)
    out = kernels.reverse_chain(lb, sb.float(), xb.float(), tb.float(), betas, order, noise=nb.float(), clip=clip)
    _ratio_check(out, ref64, ref_bf, slack=1e-2)


@needs_gpu
def test_gpu_large_batch_and_bf16_backward():
    order, S, A, E, H, T, N = "sxt", 17, 6, 16, 256, 20, 12800
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, "linear")
    res = {}
    for name, dt in (("k", torch.bfloat16), ("bf", torch.bfloat16), ("r", torch.float64)):
        lk, ts = _cast(layers, state, x, temb, noise, dtype=dt)
        if name == "k":
            ts = [t.float() for t in ts]
        params = [t.requires_grad_() for pair in lk for t in pair]
        fn = kernels.reverse_chain if name == "k" else reverse_chain_reference
        out = fn(lk, *ts[:3], betas, order, noise=ts[3], clip=1.0)
        out.float().square().mean().backward()
        res[name] = (out.double(), [p.grad.double() for p in params])
    _ratio_check(res["k"][0], res["r"][0], res["bf"][0], slack=1e-2)
    for gk, gb, gr in zip(res["k"][1], res["bf"][1], res["r"][1]):
        assert (gk - gr).norm() <= 2 * (gb - gr).norm() + 1e-2 * gr.norm()


# ----------------------------------------------------------------------------------------------------------------------
# End-to-end: sdac.py's reverse_chain with backend triton vs torch, and a tiny `--kernels triton` run
# ----------------------------------------------------------------------------------------------------------------------
def test_sdac_reverse_chain_triton_matches_torch():
    sdac = pytest.importorskip("sdac")
    torch.manual_seed(0)
    S, A, T, N = 17, 6, 20, 20
    den = sdac.Denoiser(S, A, 32, 16, T).to(DEV)
    sched = sdac.DDPMSchedule(sdac.linear_beta_schedule(T, 0.8), torch.device(DEV))
    obs = torch.randn(N, S, device=DEV)
    x = 0.5 * torch.randn(N, A, device=DEV)
    noise = torch.randn(T, N, A, device=DEV)
    with torch.no_grad():
        a_torch = sdac.reverse_chain(den, sched, obs, x, noise, backend="torch")
        a_triton = sdac.reverse_chain(den, sched, obs, x, noise, backend="triton")
    torch.testing.assert_close(a_triton, a_torch, rtol=1e-4, atol=1e-5)
    # the full sampler (particles drawn from the same torch seed, best particle by min Q) picks the same actions
    qf1, qf2 = sdac.QNetwork(S, A, 64).to(DEV), sdac.QNetwork(S, A, 64).to(DEV)
    acts = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        acts[backend] = sdac.sample_actions(den, qf1, qf2, sched, obs[:4], 4, 0.5, backend=backend)
    torch.testing.assert_close(acts["triton"], acts["torch"], rtol=1e-4, atol=1e-5)


def test_sdac_cli_runs_with_triton_and_torch_take_the_same_actions(tmp_path):
    """End to end: the same seeded sdac.py run with --kernels triton (interpreted) and --kernels torch draws the same
    noise, so the policy's actions stored in the replay buffer and the final evaluation agree within fp32 tolerance."""
    flags = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--batch-size", "8", "--learning-starts", "64",
             "--num-particles", "2", "--num-reverse-samples", "4", "--diffusion-steps", "3", "--hidden-dim", "32",
             "--eval-episodes", "1", "--max-episode-steps", "10", "--log-frequency", "2", "--total-timesteps", "72",
             "--eval-frequency", "72", "--save-model"]
    runs = {}
    for backend in ("triton", "torch"):
        (tmp_path / backend).mkdir()
        run_script("sdac.py", *flags, "--kernels", backend, cwd=tmp_path / backend)
        (run_dir,) = run_dirs(tmp_path / backend)
        summary = read_summary(run_dir)
        assert summary["kernels"] == backend and summary["global_step"] == 72
        runs[backend] = summary, torch.load(run_dir / "checkpoint.pt", weights_only=False)["rb"]["data"][2]
    (s_tri, a_tri), (s_torch, a_torch) = runs["triton"], runs["torch"]
    assert a_tri.shape == (72, 1) and not torch.equal(a_tri[64:], a_tri[56:64])  # 8 policy actions after warm-up
    torch.testing.assert_close(a_tri, a_torch, rtol=1e-4, atol=1e-4)
    assert s_tri["final_eval_return"] == pytest.approx(s_torch["final_eval_return"], rel=1e-3, abs=1e-2)


def test_diffusion_ql_chain_and_gradients_triton_match_torch():
    """Diffusion-QL trains through the chain: the fused backward must give the same denoiser gradients."""
    dql = pytest.importorskip("diffusion_ql")
    torch.manual_seed(0)
    S, A, T, N = 11, 3, 5, 21
    den = dql.Denoiser(S, A, 32, 16, T).to(DEV)
    sched = dql.DDPMSchedule(dql.vp_beta_schedule(T), torch.device(DEV))
    obs, x, noise = torch.randn(N, S, device=DEV), torch.randn(N, A, device=DEV), torch.randn(T, N, A, device=DEV)
    res = {}
    for backend in ("torch", "triton"):
        den.zero_grad()
        out = dql.reverse_chain(den, sched, obs, x, noise, backend=backend)
        (out.clamp(-1, 1) * torch.arange(1, A + 1, device=DEV)).sum().backward()
        res[backend] = (out.detach(), [p.grad.clone() for p in den.parameters()])
    torch.testing.assert_close(res["triton"][0], res["torch"][0], rtol=1e-4, atol=1e-5)
    for g_k, g_t in zip(res["triton"][1], res["torch"][1]):
        assert (g_k - g_t).norm() <= 1e-4 * g_t.norm() + 1e-6


def test_coefficient_cache_follows_in_place_edits_of_betas():
    layers, state, x, temb, noise, betas = _problem(4, 2, 16, 16, 3, 5, "vp")
    lk, (s, xx, te, nz) = _cast(layers, state, x, temb, noise, dtype=torch.float64)
    b = betas.clone()
    first = kernels.reverse_chain(lk, s, xx, te, b, "sxt", noise=nz, clip=None)
    b.copy_(linear_betas(3))  # same tensor object, new values: the cached table must not be reused
    second = kernels.reverse_chain(lk, s, xx, te, b, "sxt", noise=nz, clip=None)
    ref = reverse_chain_reference(layers, state, x, temb, linear_betas(3), "sxt", noise=noise, clip=None)
    torch.testing.assert_close(second.cpu(), ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(first, second)


def test_in_place_weight_update_before_backward_is_detected():
    layers, state, x, temb, noise, betas = _problem(4, 2, 16, 16, 3, 5, "vp")
    lk, (s, xx, te, nz) = _cast(layers, state, x, temb, noise, dtype=torch.float32)
    w2 = lk[1][0].requires_grad_()
    out = kernels.reverse_chain(lk, s, xx, te, betas, "sxt", noise=nz)
    with torch.no_grad():
        w2.add_(1.0)  # e.g. an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


PLANTED_TTGIR = """
  tt.func public @k() {
    scf.for %n0 = %c0 to %c4 step %c1  : i32 {
      %9 = tt.addptr %a, %b : tensor<16x32x!tt.ptr<f32>, #blocked>, tensor<16x32xi32, #blocked>
    }
    %5 = tt.addptr %p, %o : tensor<64x64x!tt.ptr<bf16>, #blocked>, tensor<64x64xi32, #blocked>
    %6 = tt.broadcast %r : tensor<64x1x!tt.ptr<f32>, #blocked> -> tensor<64x32x!tt.ptr<f32>, #blocked>
    %7 = tt.addptr %q, %o : tensor<8x8x!tt.ptr<bf16>, #blocked>, tensor<8x8xi32, #blocked>
    scf.for %i = %c0_i32 to %T step %c1_i32  : i32 {
      %8 = tt.load %5 : tensor<64x64x!tt.ptr<bf16>, #blocked>
      %10 = tt.load %6 : tensor<64x32x!tt.ptr<f32>, #blocked>
      %11 = tt.load %9 : tensor<16x32x!tt.ptr<f32>, #blocked>
    }
  }
"""


def test_compile_check_finds_a_tensor_kept_live_across_the_step_loop():
    """The hoisting column is not vacuous: a per-element pointer tensor defined before the step loop and used in it
    is reported as "full", a broadcast row vector as "bcast"; unused values and a sibling loop's values are not."""
    code = ("import sys; sys.argv = ['x', '--list']\n"
            "from kernels.compile_check import hoisted_across_step_loop\n"
            f"print(hoisted_across_step_loop({PLANTED_TTGIR!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "{'full': ['64x64p'], 'bcast': ['64x32p']}", proc.stdout


def test_an_enclosing_autocast_does_not_change_the_result():
    """`precision` alone decides the operand dtype: under torch.autocast (as a script's bf16 loop would run) the
    PyTorch-side ops of reverse_chain (time-bias table, weight-gradient GEMMs) stay fp32."""
    order, S, A, E, H, T, N = "xts", 6, 2, 16, 32, 3, 9
    layers, state, x, temb, noise, betas = _problem(S, A, E, H, T, N, "vp")
    l32, (s, xx, te, nz) = _cast(layers, state, x, temb, noise, dtype=torch.float32)
    outs, grads = [], []
    for amp in (False, True):
        lw = [(w.clone().requires_grad_(), b.clone().requires_grad_()) for w, b in l32]
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=amp):
            out = kernels.reverse_chain(lw, s, xx, te, betas, order, noise=nz)
        out.square().sum().backward()  # outside autocast, as PyTorch recommends for backward passes
        outs.append(out.detach())
        grads.append([p.grad for pair in lw for p in pair])
    assert outs[1].dtype == torch.float32
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
