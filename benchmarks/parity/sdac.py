"""Parity harness: sdac.py against the official JAX SDAC (mahaitongdae/diffusion_policy_online_rl @ a50cf41).

Both sides start from the same weights (the official haiku init, ported into the script's torch modules), get the same
batches and the same random draws, and run consecutive gradient updates from their own evolving states:

* the official side runs its own jitted `SDAC` update (`relax/algorithm/sdac.py`, built exactly as
  `scripts/train_mujoco.py` builds it) from a JAX key. Its intermediate quantities (sampler output per particle,
  best-of-N index, TD target, losses, gradients) come from the official pure functions (`Diffv2Net.get_action`,
  `GaussianDiffusion.p_sample` / `q_sample` / `get_recon` / `reverse_samping_weighted_p_loss`, the haiku nets) called
  on the same key; the losses and score-matching weights of that decomposition are checked against the ones the
  jitted update itself reports.
* the script's side gets every random draw the official update makes from that key (x_T and chain noise of all 32
  particles, exploration noise, t, the forward and the 64 reverse noises), re-laid out to the script's shapes
  (`UpdateNoise`), and runs `sdac.update`.

The script runs with --no-clip-actions semantics (`clip_actions=False`): the official TD target scores the unclipped
best-of-N + noise action, which the script clips by default. Two stand-in modules let the official package import on
a current JAX: `relax.utils.persistence` (policy export only; it needs `jax.core.ClosedJaxpr`, gone from JAX) and
`numpyro.distributions` (imported by the Gaussian-policy helpers, unused by SDAC).

    python benchmarks/parity/sdac.py --official diffusion_policy_online_rl            # parity table
    python benchmarks/parity/sdac.py --official diffusion_policy_online_rl --speed    # CPU speed race

Everything runs in float32 with JAX on the CPU at `jax_default_matmul_precision=highest` and one thread per side.
The comparison logic (`compare_update`, `ScriptSide`) imports no JAX; tests/test_parity_sdac.py runs it on the script
against a perturbed copy of itself.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import types
from dataclasses import dataclass, replace

import numpy as np
import torch

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the repo root: the scripts share these names
from common import Comparison, environment, load_script, require_official, speed_table, time_interleaved  # noqa: E402

sd = load_script("sdac")

URL = "https://github.com/mahaitongdae/diffusion_policy_online_rl"
COMMIT = "a50cf41"
REVERSE_SAMPLES = 64  # hard-coded in the official update (`reverse_mc_num`)
TRUNC_STD = 0.87962566  # std of N(0, 1) truncated to [-2, 2]: haiku's TruncatedNormal(1/sqrt(fan_in)) has 0.880/sqrt(fan_in)
ANCHOR_STEP = 74_996  # second segment: policy lr mid-decay (policy update 37,498) and an alpha update at step 75,000


@dataclass
class Shapes:
    obs_dim: int = 17  # HalfCheetah
    act_dim: int = 6
    batch_size: int = 256
    num_particles: int = 32
    diffusion_steps: int = 20
    hidden_dim: int = 256


def script_args(shapes: Shapes, compile_: bool) -> "sd.Args":
    """The script's flags for the official defaults at these shapes, --no-clip-actions (the official TD target)."""
    return sd.Args(batch_size=shapes.batch_size, num_particles=shapes.num_particles,
                   num_reverse_samples=REVERSE_SAMPLES, diffusion_steps=shapes.diffusion_steps,
                   hidden_dim=shapes.hidden_dim, clip_actions=False, compile=compile_)


# ---------------------------------------------------------------------------------------------------------------------
# haiku params <-> torch modules. A haiku MLP names its layers linear, linear_1, ... in call order, w: [in, out]; the
# script's modules register their nn.Linear layers in the same order (Denoiser: time MLP, then the main MLP), weight:
# [out, in].

def haiku_layer_names(params: dict) -> list[str]:
    def index(name: str) -> int:
        last = name.split("/")[-1]
        return int(last.split("_")[1]) if "_" in last else 0
    return sorted(params, key=index)


def torch_linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def haiku_to_torch(params: dict, module: torch.nn.Module) -> None:
    names, linears = haiku_layer_names(params), torch_linears(module)
    assert len(names) == len(linears), (names, linears)
    with torch.no_grad():
        for name, layer in zip(names, linears):
            w, b = np.asarray(params[name]["w"]), np.asarray(params[name]["b"])
            assert layer.weight.shape == w.T.shape, (name, layer.weight.shape, w.shape)
            layer.weight.copy_(torch.from_numpy(w.T.copy()))
            layer.bias.copy_(torch.from_numpy(b.copy()))


def torch_to_haiku(module: torch.nn.Module, names: list[str], values=None) -> dict[str, dict[str, np.ndarray]]:
    """The module's weights (or any per-parameter tensors, `values(param)`: grads, Adam moments) as a haiku tree."""
    values = values or (lambda p: p.detach())
    out = {}
    for name, layer in zip(names, torch_linears(module)):
        out[name] = {"w": values(layer.weight).double().numpy().T.copy(), "b": values(layer.bias).double().numpy().copy()}
    return out


def flat(tree: dict) -> dict[str, np.ndarray]:
    """{"q_net/linear_1": {"w": ..}} -> {"linear_1.w": ..} as float64 numpy."""
    return {f"{name.split('/')[-1]}.{k}": np.asarray(v, dtype=np.float64) for name, layer in tree.items()
            for k, v in layer.items()}


# ---------------------------------------------------------------------------------------------------------------------
# One side of the comparison: `update(batch, draws)` runs one gradient update and returns every compared quantity,
# named, in the script's layout (particle p of state b is row b * P + p; chain noise row t is added at step t).

NETS = ("q1", "q2", "target_q1", "target_q2", "policy", "target_policy")


class ScriptSide:
    """sdac.py: `update` with the given draws; intermediates are recomputed with the script's own functions."""

    def __init__(self, shapes: Shapes, compile_: bool = False):
        self.shapes, self.args = shapes, script_args(shapes, compile_)
        self.device = torch.device("cpu")
        self.agent = sd.make_agent(shapes.obs_dim, shapes.act_dim, self.args, self.device)
        self.schedule = sd.DDPMSchedule(sd.linear_beta_schedule(shapes.diffusion_steps, self.args.beta_schedule_scale),
                                        self.device)
        self.targets_fn = sd.compile_or_eager(sd.compute_targets) if compile_ else sd.compute_targets
        self.step = 0
        a = self.agent
        self.modules = {"q1": a.qf1, "q2": a.qf2, "target_q1": a.qf1_target, "target_q2": a.qf2_target,
                        "policy": a.actor, "target_policy": a.actor_target}
        q_names = [f"q_net/linear{'' if i == 0 else f'_{i}'}" for i in range(4)]
        p_names = [f"dacer_policy_net/linear{'' if i == 0 else f'_{i}'}" for i in range(6)]
        self.names = {k: p_names if "policy" in k else q_names for k in NETS}

    def load_params(self, params: dict[str, dict], log_alpha: float) -> None:
        """Haiku trees per net (keys NETS) -> the script's modules."""
        for key in NETS:
            haiku_to_torch(params[key], self.modules[key])
        with torch.no_grad():
            self.agent.log_alpha.fill_(float(log_alpha))

    def params(self) -> dict[str, dict]:
        return {k: torch_to_haiku(self.modules[k], self.names[k]) for k in NETS}

    def set_step(self, step: int) -> None:
        self.step = step

    def policy_lr(self, policy_updates: int) -> float:
        return sd.policy_lr(self.args, policy_updates)

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[torch.Tensor]]]:
        a = self.agent
        return {"q1": (a.q_optimizer, self._params("q1")), "q2": (a.q_optimizer, self._params("q2")),
                "policy": (a.actor_optimizer, self._params("policy")), "log_alpha": (a.alpha_optimizer, [a.log_alpha])}

    def _params(self, net: str) -> list[torch.Tensor]:
        """The module's parameters in haiku order: [w, b] per layer (haiku sorts "b" before "w": we use w, b)."""
        return [p for layer in torch_linears(self.modules[net]) for p in (layer.weight, layer.bias)]

    def export_state(self) -> dict:
        adam = {}
        for k, (opt, params) in self.optimizers().items():
            st = opt.state.get(params[0], {})
            count = int(st["step"]) if st else 0
            if k == "log_alpha":
                moments = [np.asarray(st[m].double().numpy()) if st else np.zeros(()) for m in ("exp_avg", "exp_avg_sq")]
            else:
                moments = [torch_to_haiku(self.modules[k], self.names[k], (lambda p, m=m: opt.state[p][m]) if st
                                          else torch.zeros_like) for m in ("exp_avg", "exp_avg_sq")]
            adam[k] = (count, *moments)
        return {"params": self.params(), "log_alpha": float(self.agent.log_alpha.detach()), "adam": adam, "step": self.step}

    def import_state(self, state: dict) -> None:
        """Load another side's state: weights, log alpha, Adam moments and counts, update counter."""
        self.load_params(state["params"], state["log_alpha"])
        for k, (opt, params) in self.optimizers().items():
            count, mu, nu = state["adam"][k]
            for p in params:
                opt.state.pop(p, None)
            if count == 0:
                continue  # torch's Adam creates zero moments at its first step, as optax's init
            if k == "log_alpha":
                moments = [(torch.tensor(np.asarray(mu), dtype=torch.float32),
                            torch.tensor(np.asarray(nu), dtype=torch.float32))]
            else:
                moments = [(torch.from_numpy(np.asarray(mu[n][c], np.float32).T.copy() if c == "w" else
                                             np.asarray(mu[n][c], np.float32).copy()),
                            torch.from_numpy(np.asarray(nu[n][c], np.float32).T.copy() if c == "w" else
                                             np.asarray(nu[n][c], np.float32).copy()))
                           for n in self.names[k] for c in ("w", "b")]
            for p, (m, v) in zip(params, moments):
                opt.state[p] = {"step": torch.tensor(float(count)), "exp_avg": m.reshape(p.shape).clone(),
                                "exp_avg_sq": v.reshape(p.shape).clone()}
        self.step = state["step"]

    def adam_given(self, grads: dict[str, dict], step: int, agent: "sd.Agent | None" = None) -> dict[str, dict]:
        """The update vectors the script's optimizers make from the current state (or `agent`'s) given these gradients
        (haiku trees for q1, q2 and, on policy steps, policy), per net as flat dicts; the agent is left unchanged."""
        saved = copy.deepcopy(agent or self.agent)  # modules and optimizers together: the optimizers use the copies
        side = copy.copy(self)
        side.agent = saved
        side.modules = {"q1": saved.qf1, "q2": saved.qf2, "policy": saved.actor}
        opts = side.optimizers()
        for k, tree in grads.items():
            for p, (n, c) in zip(opts[k][1], [(n, c) for n in self.names[k] for c in ("w", "b")]):
                g = np.asarray(tree[n][c], np.float32)
                p.grad = torch.from_numpy((g.T if c == "w" else g).copy())
                with torch.no_grad():  # Adam's step does not depend on the params: from 0, the result is the step
                    p.zero_()
        saved.q_optimizer.step()
        if "policy" in grads:
            for group_ in saved.actor_optimizer.param_groups:
                group_["lr"] = sd.policy_lr(self.args, step // self.args.policy_frequency)
            saved.actor_optimizer.step()
        return {k: flat(torch_to_haiku(side.modules[k], self.names[k])) for k in grads}

    def reverse_samples(self, x_t: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """The script's reverse-sample formula (as in `compute_targets`) on given x_t [B, A], t [B], eps [B, R, A]."""
        sch, x_t, t = self.schedule, torch.from_numpy(np.asarray(x_t, np.float32)), torch.from_numpy(np.asarray(t))
        c1, c2 = sch.sqrt_recip_alphas_cumprod[t, None, None], sch.sqrt_recipm1_alphas_cumprod[t, None, None]
        a0 = c1 * x_t[:, None] - c2 * torch.from_numpy(np.asarray(eps, np.float32))
        return a0.clamp(-1.0, 1.0).double().numpy()

    @torch.no_grad()
    def particles(self, obs: torch.Tensor, x_T: torch.Tensor, chain: torch.Tensor):
        """All P reverse-chain outputs [B*P, A], their min-Q [B*P] and the kept particle per state [B]."""
        a, P = self.agent, self.args.num_particles
        obs_rep = obs.repeat_interleave(P, 0)
        acts = sd.reverse_chain(a.actor, self.schedule, obs_rep, self.args.init_noise_scale * x_T, chain)
        clipped = acts.clamp(-1.0, 1.0)
        q = torch.min(a.qf1(obs_rep, clipped), a.qf2(obs_rep, clipped))
        return acts, q, q.view(len(obs), P).argmax(1)

    def update(self, batch: dict[str, np.ndarray], draws: "Draws") -> dict[str, np.ndarray]:
        a, args, out = self.agent, self.args, {}
        b = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in batch.items()}
        tb = (b["obs"], b["next_obs"], b["action"], b["reward"], b["done"])
        noise = sd.UpdateNoise(*[None if x is None else torch.from_numpy(np.array(x)) for x in draws.noise])
        policy_step = self.step % args.policy_frequency == 0
        for tag, obs, x_T, chain in (("TD target", b["next_obs"], noise.next_x_T, noise.next_chain),
                                     ("anchor", b["obs"], noise.anchor_x_T, noise.anchor_chain)):
            if x_T is None:
                continue
            acts, q, best = self.particles(obs, x_T, chain)
            out[f"sampler output, all particles ({tag})"] = acts
            out[f"particle min-Q ({tag})"] = q
            out[f"best-of-N index ({tag})"] = best
        captured, before = [], copy.deepcopy(a)

        def targets_fn(*fn_args):
            captured.append(self.targets_fn(*fn_args))
            return captured[-1]

        alpha = a.log_alpha.detach().exp()
        losses = sd.update(a, self.schedule, args, tb, self.step, noise, targets_fn=targets_fn)
        (targets,) = captured
        out["TD target next action a'"] = targets.next_actions
        out["TD target y"] = targets.td_target
        out["critic loss Q1"], out["critic loss Q2"] = losses["qf1_loss"], losses["qf2_loss"]
        grads = {k: torch_to_haiku(self.modules[k], self.names[k], lambda p: p.grad) for k in ("q1", "q2")}
        if policy_step:
            out["anchor a~ (best-of-N + noise)"] = targets.anchor
            out["x_t = q_sample(t, a~)"] = targets.x_t
            out["reverse samples a0_hat"] = targets.a0_hat
            out["reverse-sample min-Q"] = targets.q_rev
            out["score-matching weights softmax(Q / 0.2 alpha)"] = torch.softmax(
                targets.q_rev / (args.reward_scale * alpha), dim=1)
            out["policy loss (reweighted score matching)"] = losses["actor_loss"]
            out["policy lr"] = torch.tensor(a.actor_optimizer.param_groups[0]["lr"], dtype=torch.float64)
            grads["policy"] = torch_to_haiku(a.actor, self.names["policy"], lambda p: p.grad)
        self.last_grads = grads
        self.last_updates = self.adam_given(grads, self.step, before)  # what this update's optimizers added
        if "alpha_loss" in losses:
            out["alpha loss"] = losses["alpha_loss"]
            out["log alpha gradient"] = a.log_alpha.grad
        after = self.params()
        for k, g in grads.items():
            out.update({f"grad {k}/{n}": v for n, v in flat(g).items()})
        for k in NETS:
            out.update({f"param {k}/{n}": v for n, v in flat(after[k]).items()})
        for k, opt, module in (("q1", a.q_optimizer, a.qf1), ("q2", a.q_optimizer, a.qf2),
                               ("policy", a.actor_optimizer, a.actor)):
            if not opt.state.get(torch_linears(module)[0].weight):
                continue  # the denoiser's Adam has no moments before its first update
            for moment, tag in (("exp_avg", "Adam mu"), ("exp_avg_sq", "Adam nu")):
                tree = torch_to_haiku(module, self.names[k], lambda p: opt.state[p][moment])
                out.update({f"{tag} {k}/{n}": v for n, v in flat(tree).items()})
        out["log alpha"] = a.log_alpha.detach()
        self.step += 1
        return {k: np.asarray(v.detach().double().numpy() if torch.is_tensor(v) else v, dtype=np.float64)
                for k, v in out.items()}


def group(name: str) -> str:
    """Row of the report a quantity belongs to: per-tensor names collapse into one row per kind and network."""
    kind, _, rest = name.partition(" ")
    if kind not in ("grad", "param", "Adam"):
        return name
    net = rest.split("/")[0]
    if kind == "Adam":  # "Adam mu q1/..", "Adam nu q1/.."
        kind, net = f"Adam {rest.split(' ')[0]}", rest.split(" ")[1].split("/")[0]
    labels = {"grad": "gradients", "param": "params after update",
              "Adam mu": "Adam first moment", "Adam nu": "Adam second moment"}
    nets = {"q1": "critic 1", "q2": "critic 2", "target_q1": "target critic 1 (EMA)",
            "target_q2": "target critic 2 (EMA)", "policy": "denoiser", "target_policy": "target denoiser (EMA)"}
    return f"{labels.get(kind, kind)}: {nets.get(net, net)}"


def compare_update(comparison: Comparison, ours: dict[str, np.ndarray], official: dict[str, np.ndarray],
                   worst: dict[str, tuple] | None = None) -> None:
    """Adds every quantity both sides reported to `comparison` (one row per `group`); a quantity only one side
    reports is itself a mismatch. `worst` collects, per Adam-update / params row, the largest difference and the
    official gradient at that element relative to its tensor's largest (Adam rescales every element to ~lr)."""
    for name in sorted(set(ours) | set(official)):
        if name not in ours or name not in official:
            comparison.add(f"missing on one side: {name}", np.array([1.0]), np.array([0.0]))
            continue
        row = group(name)
        comparison.add(row, ours[name], official[name])
        grad = official.get("grad " + name.split(" ", 1)[-1]) if name.startswith("param") else None
        if worst is not None and grad is not None:
            diff = np.abs(ours[name] - official[name])
            i = np.unravel_index(diff.argmax(), diff.shape)
            ratio = abs(grad[i]) / np.abs(grad).max()
            if diff[i] > worst.get(row, (0.0, 0.0))[0]:
                worst[row] = (float(diff[i]), float(ratio))


@dataclass
class Draws:
    key: object  # JAX key of the official update (None in the no-JAX self test)
    noise: "sd.UpdateNoise"  # the same draws in the script's layout (numpy)


def numpy_draws(rng: np.random.Generator, shapes: Shapes, policy_step: bool) -> Draws:
    """Random draws in the script's layout without JAX (the self test's stand-in for `official_draws`)."""
    B, P, T, A = shapes.batch_size, shapes.num_particles, shapes.diffusion_steps, shapes.act_dim

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    chain = lambda: (normal(B * P, A), normal(T, B * P, A), normal(B, A))  # noqa: E731
    if not policy_step:
        return Draws(None, sd.UpdateNoise(*chain(), *[None] * 6))
    return Draws(None, sd.UpdateNoise(*chain(), *chain(), rng.integers(0, T, B), normal(B, A),
                                      normal(B, REVERSE_SAMPLES, A)))


def random_batch(rng: np.random.Generator, shapes: Shapes) -> dict[str, np.ndarray]:
    B, S, A = shapes.batch_size, shapes.obs_dim, shapes.act_dim
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    return {"obs": f32(rng.standard_normal((B, S))), "next_obs": f32(rng.standard_normal((B, S))),
            "action": f32(rng.uniform(-1, 1, (B, A))), "reward": f32(rng.standard_normal(B)),
            "done": f32(rng.random(B) < 0.1)}


def run_updates(comparison: Comparison, ours, official, shapes: Shapes, steps: list[int], seed: int,
                make_draws, resync: bool = True, worst: dict | None = None) -> None:
    """Consecutive updates; `steps` are the update counters (a jump sets both sides). With `resync` the script's side
    starts every update from the official side's state (weights, Adam moments, alpha, counters), so each row holds
    one-update differences; without it both sides run from their own states and differences compound.
    With `resync` the script's optimizers also get the official gradients, from the same state, to isolate Adam."""
    rng = np.random.default_rng(seed)
    for i, step in enumerate(steps):
        if i == 0 or step != steps[i - 1] + 1:
            ours.set_step(step)
            official.set_step(step)
        batch = random_batch(rng, shapes)
        draws = make_draws(i, step)
        if resync:
            ours.import_state(official.export_state())
        theirs = official.update(batch, draws)
        if resync and getattr(official, "last_updates", None) is not None:
            for net, updates in ours.adam_given(official.last_grads, step).items():
                for name, u in updates.items():
                    comparison.add("Adam update vector given the official gradients (torch Adam vs optax)", u,
                                   official.last_updates[net][name])
        compare_update(comparison, ours.update(batch, draws), theirs, worst)
        if resync and "x_t = q_sample(t, a~)" in theirs:  # the reverse-sample formula alone, on the official x_t
            comparison.add("reverse samples a0_hat from the official x_t", ours.reverse_samples(
                theirs["x_t = q_sample(t, a~)"], draws.noise.t, draws.noise.reverse_eps), theirs["reverse samples a0_hat"])
            if getattr(official, "recon_op_by_op", None) is not None:
                comparison.add("reverse samples a0_hat from the official x_t, vs official get_recon run op by op",
                               ours.reverse_samples(theirs["x_t = q_sample(t, a~)"], draws.noise.t,
                                                    draws.noise.reverse_eps), official.recon_op_by_op)
                comparison.add("official get_recon: op by op vs inside the jitted step (official vs itself)",
                               official.recon_op_by_op, theirs["reverse samples a0_hat"])


def compare_lr_schedules(comparison: Comparison, ours, official, counts=(0, 1, 24_999, 25_000, 25_001, 37_500,
                                                                         50_000, 74_999, 75_000, 75_001, 100_000)):
    for count in counts:
        comparison.add("policy lr schedule (11 policy-update counts, 0 to 100k)", ours.policy_lr(count),
                       official.policy_lr(count))


# ---------------------------------------------------------------------------------------------------------------------
# The official side (imports JAX; only here).

def import_official(path: str):
    """Import the official package from a checkout, with stand-ins for its two modules that cannot import here."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_default_matmul_precision", "highest")
    persistence = types.ModuleType("relax.utils.persistence")
    persistence.make_persist = None  # only used to export policies
    numpyro, distributions = types.ModuleType("numpyro"), types.ModuleType("numpyro.distributions")
    distributions.Normal = None  # only used by the Gaussian-policy nets (SAC, DSAC), not by SDAC
    numpyro.distributions = distributions
    sys.modules.update({"relax.utils.persistence": persistence, "numpyro": numpyro,
                        "numpyro.distributions": distributions})
    sys.path.insert(0, path)
    from relax.algorithm.sdac import SDAC
    from relax.network.diffv2 import create_diffv2_net
    from relax.utils.experience import Experience
    return SDAC, create_diffv2_net, Experience


def mish_jax(x):
    import jax
    import jax.numpy as jnp
    return x * jnp.tanh(jax.nn.softplus(x))  # the activation scripts/train_mujoco.py passes for sdac


class OfficialSide:
    def __init__(self, path: str, shapes: Shapes, seed: int):
        import jax
        import jax.numpy as jnp
        import optax

        self.jax, self.jnp, self.optax = jax, jnp, optax
        SDAC, create_diffv2_net, self.Experience = import_official(path)
        self.shapes = shapes
        hidden = [shapes.hidden_dim] * 3
        with contextlib.redirect_stdout(io.StringIO()):  # haiku modules print themselves at init
            # as scripts/train_mujoco.py builds --alg sdac with its defaults
            self.agent, params = create_diffv2_net(jax.random.key(seed), shapes.obs_dim, shapes.act_dim, hidden, hidden,
                                                   mish_jax, num_timesteps=shapes.diffusion_steps,
                                                   num_particles=shapes.num_particles, noise_scale=0.1,
                                                   beta_schedule_scale=0.8)
            self.alg = SDAC(self.agent, params, lr=3e-4, alpha_lr=7e-3, delay_alpha_update=250.0,
                            lr_schedule_end=3e-5)
        self.state = self.alg.state
        self.pieces = jax.jit(self._pieces)

    # -- state access
    def params(self) -> dict[str, dict]:
        p = self.state.params
        trees = {"q1": p.q1, "q2": p.q2, "target_q1": p.target_q1, "target_q2": p.target_q2, "policy": p.policy,
                 "target_policy": p.target_poicy}
        return {k: self.jax.tree_util.tree_map(np.asarray, v) for k, v in trees.items()}

    def log_alpha(self) -> float:
        return float(self.state.params.log_alpha)

    def export_state(self) -> dict:
        """Everything an update reads, in the neutral layout `ScriptSide.import_state` takes."""
        tree_map, opt = self.jax.tree_util.tree_map, self.state.opt_state
        adam = {k: (int(a.count), tree_map(np.asarray, a.mu), tree_map(np.asarray, a.nu)) for k, a in
                (("q1", opt.q1[0]), ("q2", opt.q2[0]), ("policy", opt.policy[0]), ("log_alpha", opt.log_alpha[0]))}
        return {"params": self.params(), "log_alpha": self.log_alpha(), "adam": adam, "step": int(self.state.step)}

    def set_step(self, step: int) -> None:
        """Jump the update counter: the jitted step's `step` and the policy lr schedule's count (policy updates so
        far). Adam's own counts (bias correction) stay, as the script's Adam `step`s do."""
        adam, schedule = self.state.opt_state.policy
        opt_state = self.state.opt_state._replace(policy=(adam, schedule._replace(count=self.jnp.int32(
            (step + 1) // 2))))
        self.state = self.state._replace(step=self.jnp.int32(step), opt_state=opt_state)

    def policy_lr(self, policy_updates: int) -> float:
        """The lr the official policy optimizer applies at this count, read off one step of the optimizer itself: with
        both moments 1, grads 1 and a huge Adam count (bias corrections exactly 1 in fp32), the step is -lr exactly."""
        jnp, tree_map = self.jnp, self.jax.tree_util.tree_map
        params = self.state.params.policy
        adam, schedule = self.alg.policy_optim.init(params)
        ones = tree_map(jnp.ones_like, params)
        state = (adam._replace(count=jnp.int32(2**30), mu=ones, nu=ones),
                 schedule._replace(count=jnp.int32(policy_updates)))
        updates, _ = self.alg.policy_optim.update(ones, state)
        return -float(np.asarray(self.jax.tree_util.tree_leaves(updates)[0]).ravel()[0])

    # -- random draws: the official update's key, and the same draws laid out for the script
    def draws(self, key) -> Draws:
        jax, jnp = self.jax, self.jnp
        B, P, T, A = (self.shapes.batch_size, self.shapes.num_particles, self.shapes.diffusion_steps,
                      self.shapes.act_dim)
        next_key, new_key, _, _, _, time_key, noise_key = jax.random.split(key, 7)  # as the jitted update splits

        def action_draws(key):
            # Diffv2Net.get_action: key -> (particle keys, exploration key); p_sample: particle key -> (x_T, chain)
            key, explore_key = jax.random.split(key)
            pairs = jax.vmap(jax.random.split)(jax.random.split(key, P))  # [P, 2]
            x = jax.vmap(lambda k: jax.random.normal(k, (B, A)))(pairs[:, 0])  # [P, B, A]
            chain = jax.vmap(lambda k: jax.random.normal(k, (T, B, A)))(pairs[:, 1])  # [P, T, B, A], row i at t=T-1-i
            x_T = np.asarray(jnp.transpose(x, (1, 0, 2)).reshape(B * P, A))
            chain = np.asarray(jnp.transpose(chain[:, ::-1], (1, 2, 0, 3)).reshape(T, B * P, A))
            return x_T, chain, np.asarray(jax.random.normal(explore_key, (B, A)))

        key1, key2 = jax.random.split(noise_key)
        t = np.asarray(jax.random.randint(time_key, (B,), 0, T)).astype(np.int64)
        q_eps = np.asarray(jax.random.normal(key1, (B, A)))
        rev_eps = np.asarray(jax.random.normal(key2, (B * REVERSE_SAMPLES, A))).reshape(B, REVERSE_SAMPLES, A)
        policy_step = int(self.state.step) % 2 == 0
        anchor = action_draws(new_key) + (t, q_eps, rev_eps) if policy_step else (None,) * 6
        return Draws(key, sd.UpdateNoise(*action_draws(next_key), *anchor))

    # -- the official pure functions on one key: every intermediate the jitted update computes internally
    def _pieces(self, key, state, data):
        jax, jnp, agent = self.jax, self.jnp, self.agent
        P, T, R = self.shapes.num_particles, self.shapes.diffusion_steps, REVERSE_SAMPLES
        p = state.params
        next_key, new_key, _, _, _, time_key, noise_key = jax.random.split(key, 7)
        min_q = lambda q1, q2, s, a: jnp.minimum(agent.q(q1, s, a), agent.q(q2, s, a))  # noqa: E731
        policy_params = (p.policy, p.log_alpha, p.q1, p.q2)

        def particles(key, obs):
            key, _ = jax.random.split(key)
            model = lambda t, x: agent.policy(p.policy, obs, x, t)  # noqa: E731
            acts = jax.vmap(lambda k: agent.diffusion.p_sample(k, model, (obs.shape[0], agent.act_dim)))(
                jax.random.split(key, P))  # [P, B, A]
            q = jax.vmap(lambda a: min_q(p.q1, p.q2, obs, a))(acts)  # [P, B] (on the unclipped output, as get_action)
            return acts, q, jnp.argmax(q, axis=0)

        out = {}
        out["next_particles"] = particles(next_key, data.next_obs)
        next_action = agent.get_action(next_key, policy_params, data.next_obs)
        y = data.reward * 0.2 + (1 - data.done) * 0.99 * min_q(p.target_q1, p.target_q2, data.next_obs, next_action)
        out["next_action"], out["y"] = next_action, y

        def q_loss(q_params):
            return jnp.mean((agent.q(q_params, data.obs, data.action) - y) ** 2)

        out["q1_loss"], out["q1_grad"] = jax.value_and_grad(q_loss)(p.q1)
        out["q2_loss"], out["q2_grad"] = jax.value_and_grad(q_loss)(p.q2)

        out["anchor_particles"] = particles(new_key, data.obs)
        anchor = agent.get_action(new_key, policy_params, data.obs)
        key1, key2 = jax.random.split(noise_key)
        t = jax.random.randint(time_key, (data.obs.shape[0],), 0, T)
        x_t = jax.vmap(agent.diffusion.q_sample)(t, anchor, jax.random.normal(key1, anchor.shape))
        eps = jax.random.normal(key2, (anchor.shape[0] * R, anchor.shape[1]))
        x_t_rep, t_rep, obs_rep = (jnp.repeat(v, R, axis=0) for v in (x_t, t, data.obs))
        recon = agent.diffusion.get_recon(t_rep, x_t_rep, eps).clip(-1, 1)
        q_rev = min_q(p.q1, p.q2, obs_rep, recon)
        logits = (q_rev * 5.0 / jnp.exp(p.log_alpha)).reshape(-1, R)
        weights = jnp.exp(logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)).flatten()

        def policy_loss(policy):
            model = lambda t, x: agent.policy(policy, obs_rep, x, t)  # noqa: E731
            return agent.diffusion.reverse_samping_weighted_p_loss(eps, weights, model, t_rep, x_t_rep)

        out["policy_loss"], out["policy_grad"] = jax.value_and_grad(policy_loss)(p.policy)
        out.update(anchor=anchor, x_t=x_t, recon=recon.reshape(-1, R, anchor.shape[1]), q_rev=q_rev.reshape(-1, R),
                   weights=weights.reshape(-1, R), t=t)

        def alpha_loss(log_alpha):
            entropy = 0.5 * agent.act_dim * jnp.log(2 * jnp.pi * jnp.exp(1) * (0.1 * jnp.exp(log_alpha)) ** 2)
            return -log_alpha * (-jax.lax.stop_gradient(entropy) + agent.target_entropy)

        out["alpha_loss"], out["alpha_grad"] = jax.value_and_grad(alpha_loss)(p.log_alpha)
        return out

    def update(self, batch: dict[str, np.ndarray], draws: Draws) -> dict[str, np.ndarray]:
        jnp = self.jnp
        data = self.Experience(obs=jnp.asarray(batch["obs"]), action=jnp.asarray(batch["action"]),
                               reward=jnp.asarray(batch["reward"]), done=jnp.asarray(batch["done"]),
                               next_obs=jnp.asarray(batch["next_obs"]))
        step = int(self.state.step)
        policy_step, alpha_step = step % 2 == 0, step % 250 == 0
        B, P, A = self.shapes.batch_size, self.shapes.num_particles, self.shapes.act_dim
        pieces = self.jax.tree_util.tree_map(np.asarray, self.pieces(draws.key, self.state, data))
        out = {}
        tags = (("TD target", "next_particles"),) + ((("anchor", "anchor_particles"),) if policy_step else ())
        for tag, name in tags:
            acts, q, best = pieces[name]
            out[f"sampler output, all particles ({tag})"] = acts.transpose(1, 0, 2).reshape(B * P, A)
            out[f"particle min-Q ({tag})"] = q.T.reshape(B * P)
            out[f"best-of-N index ({tag})"] = best
        out["TD target next action a'"], out["TD target y"] = pieces["next_action"], pieces["y"]
        out["critic loss Q1"], out["critic loss Q2"] = pieces["q1_loss"], pieces["q2_loss"]
        grads = {"q1": pieces["q1_grad"], "q2": pieces["q2_grad"]}
        if policy_step:
            out["anchor a~ (best-of-N + noise)"] = pieces["anchor"]
            out["x_t = q_sample(t, a~)"] = pieces["x_t"]
            out["reverse samples a0_hat"] = pieces["recon"]
            out["reverse-sample min-Q"] = pieces["q_rev"]
            out["score-matching weights softmax(Q / 0.2 alpha)"] = pieces["weights"]
            out["policy loss (reweighted score matching)"] = pieces["policy_loss"]
            out["policy lr"] = np.float64(self.policy_lr(int(self.state.opt_state.policy[1].count)))
            grads["policy"] = pieces["policy_grad"]
        if alpha_step:
            out["alpha loss"], out["log alpha gradient"] = pieces["alpha_loss"], pieces["alpha_grad"]
        self.last_grads = grads
        self.recon_op_by_op = None
        if policy_step:  # the official get_recon outside jit (each op rounds to fp32: no fused multiply-adds)
            R = REVERSE_SAMPLES
            rep = lambda v: jnp.repeat(jnp.asarray(v), R, axis=0)  # noqa: E731
            recon = self.agent.diffusion.get_recon(rep(pieces["t"]), rep(pieces["x_t"]),
                                                   jnp.asarray(draws.noise.reverse_eps).reshape(-1, A)).clip(-1, 1)
            self.recon_op_by_op = np.asarray(recon, np.float64).reshape(B, R, A)
        # the official optimizers' update vectors for these gradients (what the jitted step adds to the params)
        opt, tree_map = self.state.opt_state, self.jax.tree_util.tree_map
        self.last_updates = {k: flat(tree_map(np.asarray, o.update(grads[k], st)[0])) for k, o, st in
                             (("q1", self.alg.optim, opt.q1), ("q2", self.alg.optim, opt.q2),
                              ("policy", self.alg.policy_optim, opt.policy)) if k in grads}

        self.state, info = self.alg._update(draws.key, self.state, data)  # the official jitted update itself

        # the decomposition above must be what the jitted update computed
        checks = {"decomposition vs jitted update: critic losses": (
                      np.array([pieces["q1_loss"], pieces["q2_loss"]]), np.array([info["q1_loss"], info["q2_loss"]])),
                  "decomposition vs jitted update: policy loss": (pieces["policy_loss"], info["policy_loss"]),
                  "decomposition vs jitted update: score-matching weights": (
                      pieces["weights"].ravel(), np.asarray(info["hist_q_weights"])),
                  "decomposition vs jitted update: sampled t": (np.repeat(pieces["t"], REVERSE_SAMPLES),
                                                                np.asarray(info["hist_t"]))}
        self.self_checks = {k: (np.asarray(a, np.float64), np.asarray(b, np.float64)) for k, (a, b) in checks.items()}
        after = self.params()
        for k, g in grads.items():
            out.update({f"grad {k}/{n}": v for n, v in flat(g).items()})
        for k in NETS:
            out.update({f"param {k}/{n}": v for n, v in flat(after[k]).items()})
        opt = self.state.opt_state
        for k, adam in (("q1", opt.q1[0]), ("q2", opt.q2[0]), ("policy", opt.policy[0])):
            if k == "policy" and int(adam.count) == 0:
                continue
            out.update({f"Adam mu {k}/{n}": v for n, v in flat(self.jax.tree_util.tree_map(np.asarray, adam.mu)).items()})
            out.update({f"Adam nu {k}/{n}": v for n, v in flat(self.jax.tree_util.tree_map(np.asarray, adam.nu)).items()})
        out["log alpha"] = np.float64(self.log_alpha())
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Init distribution: the script's haiku_linear against haiku's own hk.Linear default, layer by layer, many draws.

def init_table(path: str, shapes: Shapes, draws: int = 64) -> tuple[str, bool]:
    import haiku as hk
    import jax
    import jax.numpy as jnp
    from scipy.stats import ks_2samp

    import_official(path)
    from relax.network.blocks import DACERPolicyNet, QNet

    S, A, H = shapes.obs_dim, shapes.act_dim, shapes.hidden_dim
    with contextlib.redirect_stdout(io.StringIO()):
        q = hk.without_apply_rng(hk.transform(lambda o, a: QNet([H] * 3, mish_jax)(o, a)))
        pi = hk.without_apply_rng(hk.transform(lambda o, a, t: DACERPolicyNet([H] * 3, mish_jax)(o, a, t)))
        keys = jax.random.split(jax.random.key(1234), draws)
        o, a = jnp.zeros((1, S)), jnp.zeros((1, A))
        official = {"critic": jax.vmap(lambda k: q.init(k, o, a))(keys),
                    "denoiser": jax.vmap(lambda k: pi.init(k, o, a, 0))(keys)}
    torch.manual_seed(1234)
    ours = {"critic": [sd.QNetwork(S, A, H) for _ in range(draws)],
            "denoiser": [sd.Denoiser(S, A, H, 16, shapes.diffusion_steps) for _ in range(draws)]}
    lines = ["| network / layer | fan_in | weights per side | std * sqrt(fan_in), ours | haiku | max abs * sqrt(fan_in), "
             "ours | haiku | KS p-value | biases zero | ok |", "|---|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|"]
    ok_all = True
    for net in ("critic", "denoiser"):
        names = haiku_layer_names(official[net])
        for i, name in enumerate(names):
            w_off = np.asarray(official[net][name]["w"], np.float64).ravel()
            b_off = np.asarray(official[net][name]["b"])
            w_ours = np.concatenate([torch_linears(m)[i].weight.detach().double().numpy().ravel() for m in ours[net]])
            b_ours = np.concatenate([torch_linears(m)[i].bias.detach().numpy() for m in ours[net]])
            fan_in = official[net][name]["w"].shape[1]
            s = np.sqrt(fan_in)
            z_o, z_h = w_ours * s, w_off * s  # in units of 1/sqrt(fan_in)
            std_o, std_h = z_o.std(), z_h.std()
            se = lambda z: np.sqrt(np.var(z ** 2) / len(z)) / (2 * z.std())  # noqa: E731  (delta method)
            p = ks_2samp(z_o, z_h).pvalue
            zero = not b_ours.any() and not b_off.any()
            ok = (abs(std_o - std_h) < 5 * np.hypot(se(z_o), se(z_h)) and abs(std_o - TRUNC_STD) < 5 * se(z_o)
                  and p > 1e-3 and zero and max(abs(z_o).max(), abs(z_h).max()) <= 2 + 1e-5)
            ok_all &= ok
            lines.append(f"| {net} {name.split('/')[-1]} | {fan_in} | {len(w_off):,} | {std_o:.4f} | {std_h:.4f} | "
                         f"{abs(z_o).max():.4f} | {abs(z_h).max():.4f} | {p:.3f} | "
                         f"{'yes' if zero else 'no'} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines), ok_all


# ---------------------------------------------------------------------------------------------------------------------

def parity(args) -> int:
    import jax

    shapes = Shapes(obs_dim=args.obs_dim, act_dim=args.act_dim, batch_size=args.batch_size)
    official = OfficialSide(args.official, shapes, args.seed)
    ours = ScriptSide(shapes, compile_=args.compile)
    ours.load_params(official.params(), official.log_alpha())
    comparison = Comparison()
    for k, tree in ours.params().items():  # the port haiku -> torch -> haiku is exact
        for n, v in flat(tree).items():
            comparison.add("weight port haiku -> torch -> haiku (exact)", v, flat(official.params()[k])[n])
    compare_lr_schedules(comparison, ours, official)
    steps = list(range(args.updates)) + list(range(ANCHOR_STEP, ANCHOR_STEP + args.updates))
    keys = jax.random.split(jax.random.key(args.seed + 1), len(steps))
    def make_draws(i, step):
        return official.draws(keys[i])

    next_actions, worst = [], {}

    class Checked:  # wraps the official side to add its decomposition-vs-jitted checks after each update
        def __getattr__(self, name):
            return getattr(official, name)

        def update(self, batch, draws):
            out = official.update(batch, draws)
            next_actions.append(out["TD target next action a'"])
            for name, (a, b) in official.self_checks.items():
                comparison.add(name, a, b)
            return out

    run_updates(comparison, ours, Checked(), shapes, steps, args.seed, make_draws, resync=not args.free_running,
                worst=worst)
    outside = np.mean(np.abs(next_actions[0]) > 1)  # what --clip-actions changes in the TD target (alpha = 5)
    title = (f"sdac.py vs official SDAC ({COMMIT}): {len(steps)} updates (steps {steps[0]}-{steps[args.updates - 1]}, "
             f"then {steps[args.updates]}-{steps[-1]}), obs {shapes.obs_dim}, act {shapes.act_dim}, batch "
             f"{shapes.batch_size}, {shapes.num_particles} particles, T {shapes.diffusion_steps}, {REVERSE_SAMPLES} "
             f"reverse samples, script {'compiled' if args.compile else 'eager'}, --no-clip-actions, "
             f"{'free-running' if args.free_running else 'script restarted from the official state every update'}")
    code = comparison.report(title)
    for row, (diff, ratio) in sorted(worst.items()):
        if diff / max(comparison.rows[row][0], 1e-30) > 0.999 and comparison.rows[row][1] > comparison.tolerance:
            print(f"{row}: the largest difference ({diff:.3g}) is at an element whose official gradient is "
                  f"{ratio:.2g} x its tensor's largest")
    print(f"first update: {outside:.1%} of the official TD-target action coordinates lie outside [-1, 1] "
          "(--clip-actions clips them)")
    if not args.skip_init:
        table, ok = init_table(args.official, shapes)
        print(f"\n### init distribution per layer: script vs haiku's hk.Linear default (64 draws each)\n\n{table}\n")
        print("OK: every layer matches haiku's initializer" if ok else "MISMATCH in the init distribution")
        code = code or (0 if ok else 1)
    return code


def speed(args) -> int:
    import jax

    shapes = Shapes(obs_dim=args.obs_dim, act_dim=args.act_dim, batch_size=args.batch_size)
    official = OfficialSide(args.official, shapes, args.seed)
    rng = np.random.default_rng(args.seed)
    batch = random_batch(rng, shapes)
    data = official.Experience(**{k: jax.numpy.asarray(v) for k, v in batch.items()})
    keys = iter(jax.random.split(jax.random.key(args.seed), 10_000))

    def official_update():
        official.state, info = official.alg._update(next(keys), official.state, data)
        jax.block_until_ready(official.state)

    fns = {"official (JAX jit)": official_update}
    tb = tuple(torch.from_numpy(batch[k]) for k in ("obs", "next_obs", "action", "reward", "done"))
    for compile_ in ([True, False] if args.compile else [False]):
        side = ScriptSide(shapes, compile_=compile_)
        side.load_params(official.params(), official.log_alpha())
        side.args = replace(side.args, clip_actions=True)  # the script's default; clipping costs nothing measurable

        def ours_update(side=side):
            noise = sd.draw_update_noise(side.args, side.step, shapes.act_dim, side.device)
            sd.update(side.agent, side.schedule, side.args, tb, side.step, noise, targets_fn=side.targets_fn)
            side.step += 1

        fns[f"sdac.py ({'torch.compile' if compile_ else 'eager'})"] = ours_update
    for fn in fns.values():  # compile both kinds of update (policy and critic-only steps) before timing
        fn()
        fn()
    results = time_interleaved(fns, rounds=args.rounds, calls=args.calls)
    print(f"## CPU speed: one SDAC update (critic + policy steps alternate), obs {shapes.obs_dim}, act "
          f"{shapes.act_dim}, batch {shapes.batch_size}, T {shapes.diffusion_steps}, {shapes.num_particles} particles, "
          f"{REVERSE_SAMPLES} reverse samples; {args.rounds} interleaved rounds of {args.calls} updates; one thread "
          f"per side\n\n{environment()}; XLA_FLAGS={os.environ.get('XLA_FLAGS')}; torch threads "
          f"{torch.get_num_threads()}\n\n{speed_table(results, 'official (JAX jit)')}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", help="checkout of mahaitongdae/diffusion_policy_online_rl at a50cf41")
    parser.add_argument("--speed", action="store_true", help="time the updates instead of comparing them")
    parser.add_argument("--updates", type=int, default=6, help="consecutive updates per segment (two segments)")
    parser.add_argument("--obs-dim", type=int, default=None, help="default: 17 (parity), 105 = Ant-v5 (speed)")
    parser.add_argument("--act-dim", type=int, default=None, help="default: 6 (parity), 8 = Ant-v5 (speed)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="run the script's update with --compile (its default)")
    parser.add_argument("--free-running", action="store_true",
                        help="let both sides run from their own states (default: the script restarts every update from "
                             "the official state)")
    parser.add_argument("--skip-init", action="store_true", help="skip the init-distribution table")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2, help="updates per round (even: policy steps alternate)")
    args = parser.parse_args()
    args.official = require_official(args.official, URL, COMMIT)
    args.obs_dim = args.obs_dim or (105 if args.speed else 17)
    args.act_dim = args.act_dim or (8 if args.speed else 6)
    # one thread per side: XLA's CPU client reads its flags when JAX starts
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    torch.set_num_threads(1)
    return speed(args) if args.speed else parity(args)


if __name__ == "__main__":
    sys.exit(main())
