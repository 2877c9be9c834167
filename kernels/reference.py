"""Plain-PyTorch reference for the fused kernels: the denoiser MLP, the DDPM reverse step, the T-step chain, schedules.

Everything here is ordinary autograd code, written to match the five scripts (and the API in kernels/README.md)
term by term, so the Triton kernels in `kernels/chain.py` can be checked against it in any dtype (fp64 for gradcheck).
It is independent of the kernels: nothing in this file imports Triton.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ORDERS = ("sxt", "xts")


# ----------------------------------------------------------------------------------------------------------------------
# Beta schedules (all return float64 [T]; index i is the beta of DDPM step t = i, i.e. t = 1..T in paper notation)
# ----------------------------------------------------------------------------------------------------------------------
def linear_betas(T: int, scale: float = 0.8) -> torch.Tensor:
    """SDAC (and DACER's default in SDACr): beta = scale * linspace(1e-4, 0.999, T)."""
    return scale * torch.linspace(1e-4, 0.999, T, dtype=torch.float64)


def vp_betas(T: int, b_min: float = 0.1, b_max: float = 10.0) -> torch.Tensor:
    """VP schedule (Diffusion-QL, DACER): beta_t = 1 - exp(-b_min/T - 0.5 (b_max - b_min)(2t - 1)/T^2), t = 1..T."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    return 1.0 - torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T**2)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule as in Diffusion-QL/QVPO helpers: x = linspace(0, T+1, T+1) (sic), clip to [0, max_beta]."""
    steps = T + 1
    x = torch.linspace(0, steps, steps, dtype=torch.float64)
    ac = torch.cos(((x / steps) + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    return torch.clip(1 - ac[1:] / ac[:-1], 0, max_beta)


SCHEDULES = {"linear": linear_betas, "vp": vp_betas, "cosine": cosine_betas}


def ddpm_coefficients(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The DDPM posterior coefficients (kernels/README.md, "API"), computed in float64 ([T] each)."""
    betas = betas.to(torch.float64)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "sqrt_recip_ac": torch.sqrt(1.0 / ac),
        "sqrt_recipm1_ac": torch.sqrt(1.0 / ac - 1.0),
        "c1": betas * torch.sqrt(ac_prev) / (1.0 - ac),
        "c2": (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac),
        "post_std": torch.exp(0.5 * torch.log(torch.clamp(post_var, min=1e-20))),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Denoiser MLP and the chain
# ----------------------------------------------------------------------------------------------------------------------
def mlp_forward(layers, state: torch.Tensor, x: torch.Tensor, temb_t: torch.Tensor, order: str) -> torch.Tensor:
    """eps = L4(mish(L3(mish(L2(mish(L1(cat))))))) with cat = [state, x, temb] ("sxt") or [x, temb, state] ("xts").

    state [N, S], x [N, A], temb_t [E] or [N, E] -> eps [N, A]. Layers are (weight [out, in], bias [out]) pairs.
    """
    if temb_t.dim() == 1:
        temb_t = temb_t.expand(x.shape[0], -1)
    h = torch.cat([state, x, temb_t] if order == "sxt" else [x, temb_t, state], dim=1)
    for i, (w, b) in enumerate(layers):
        h = F.linear(h, w, b)
        if i < len(layers) - 1:
            h = F.mish(h)
    return h


def reverse_step(x, eps, t: int, coef: dict[str, torch.Tensor], noise_t, clip: float | None, add_noise: bool):
    """One DDPM posterior step: x0 = clip(sqrt(1/ac) x - sqrt(1/ac - 1) eps); x <- c1 x0 + c2 x (+ std noise)."""
    x0 = coef["sqrt_recip_ac"][t] * x - coef["sqrt_recipm1_ac"][t] * eps
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = coef["c1"][t] * x0 + coef["c2"][t] * x
    if add_noise:
        out = out + coef["post_std"][t] * noise_t
    return out


def reverse_chain_reference(layers, state, x, temb, betas, order, noise=None, clip=1.0, final_noise=False):
    """The T-step reverse chain, t = T-1 .. 0, in plain PyTorch (same signature as `kernels.reverse_chain`, minus the
    seed: the reference always takes its noise as a tensor [T, N, A]). Coefficients are cast to x's dtype."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    T = temb.shape[0]
    coef = {k: v.to(device=x.device, dtype=x.dtype) for k, v in ddpm_coefficients(betas).items()}
    for t in range(T - 1, -1, -1):
        eps = mlp_forward(layers, state, x, temb[t], order)
        add = t > 0 or final_noise
        x = reverse_step(x, eps, t, coef, noise[t] if add else None, clip, add)
    return x


def make_layers(S: int, A: int, E: int, H: int, dtype=torch.float32, device="cpu", generator=None, scale=1.0):
    """Random denoiser weights in nn.Linear's default init (U(-1/sqrt(in), 1/sqrt(in))), times `scale`."""
    dims = [S + A + E, H, H, H, A]
    layers = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        bound = scale / math.sqrt(fan_in)
        w = (torch.rand(fan_out, fan_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        b = (torch.rand(fan_out, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        layers.append((w.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)))
    return layers
