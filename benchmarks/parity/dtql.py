"""Parity of dtql.py with the official DTQL code, update by update, and their speed side by side.

    python benchmarks/parity/dtql.py --official Diffusion_Trusted_Q_Learning            # parity tables
    python benchmarks/parity/dtql.py --official Diffusion_Trusted_Q_Learning --speed    # ms per update

Both implementations are built with the same shapes and the official row of one task (default: the official code's
default task, antmaze-large-diverse-v0: batch 2048, NLL term on; `--task hopper-medium-v2` is the script's default
preset). The official initial weights are copied into the script's networks; then both run `--pretrain-updates`
pretraining updates (official `pretrain`) and `--updates` main-loop updates (official `train`) on identical batches of
one synthetic dataset, with identical random draws. The draws are injected by replacing the RNG calls both sides
make (torch.randint / rand / randn / randn_like, the Normal's `_standard_normal`, torch.multinomial) with scripted
queues: each entry is used exactly once, by the call each side makes for it, with its shape checked. The cosine lr
decay is on (`--lr-decay`, the row's own value with `--no-lr-decay`) with T_max = `--updates`, so the lr moves at
every update; the official step counter starts at `--start-step` (998) so that its EMA copy (step >= 1000, every
5 steps) is updated inside the compared updates (at 1000 and 1005). The official EMA copies (the policy's, updated,
and the BC model's, never updated) are never read by the official code and the script does not build them: the
harness fills them with NaN, and every compared quantity stays finite and equal.

Compared at every update: each loss term, the noise levels, the policy's actions, every gradient at each optimizer
step (DTQL clips no gradient: the harness checks that neither side calls clip_grad_norm_, so "before" and "after
clipping" are one row), every parameter after each optimizer step, the Adam moments, the target critic, the
learning rates. Then: the evaluation action choice from identical candidates, the lr over a full-length schedule
(official CosineAnnealingLR stepped every update vs the script's closed form), the per-task table, and the
initialisation (exact under one seed per network, and per-layer mean/std over many seeds of each side's builder).

The official code is imported from `--official` (a checkout at the pinned commit); nothing of it is copied here. Its
`main.py` (gym, d4rl) is not imported, only read for its hyper-parameter table; `einops` (imported by its
diffusion/mlps.py, used only for 0-d noise levels, which DTQL never passes) gets a stand-in when not installed.
`--self-test` runs the same comparison with the script on both sides (no official code needed); `--perturb` plants
one deliberate difference on one side, which must be reported.
"""

import argparse
import ast
import contextlib
import math
import os
import statistics
import sys
import time
import types
import warnings
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the repo root: the scripts share these names
from common import (Comparison, draw_shape, environment, load_script, require_official, speed_table,  # noqa: E402
                    time_interleaved)

URL = "https://github.com/TianyuCodings/Diffusion_Trusted_Q_Learning"
COMMIT = "9a29cea"
PERTURBATIONS = ("none", "tau", "nll_weight", "expectile", "eval_q", "init")
# D4RL observation / action sizes of each official task family (the shapes the official code was run with)
DIMS = {"halfcheetah": (17, 6), "hopper": (11, 3), "walker2d": (17, 6), "antmaze": (29, 8), "pen": (45, 24),
        "kitchen": (60, 9)}

# Official parameter names -> the script's (the layer indices are equal; only the container names differ).
PREFIXES = {"q1_model.": "q1.", "q2_model.": "q2.", "v_model.": "v.", "embed.": "time_mlp.", "layers.layers.": "net."}


def our_name(official: str) -> str:
    for old, new in PREFIXES.items():
        if official.startswith(old):
            return new + official[len(old):]
    return official  # the policy: net.{0,2,4,6} on both sides


# ------------------------------------------------------------------------------------------------------------------
# Scripted random draws


class ScriptedRNG:
    """Replaces torch.randint / rand / randn / randn_like, torch.distributions.normal._standard_normal and
    torch.multinomial by queues of given values.

    `queues` maps a function name to a list of tensors; every call pops the next one and checks its shape (and, for
    randint, the range asked for; for rand, float64). `multinomial` entries are uniforms u in [0, 1), one per row of
    probabilities: the index returned is the inverse CDF at u, so identical probabilities give identical picks, and
    the probabilities seen are recorded. Leaving the context with a value unused, or calling with an empty queue,
    raises. Any clip_grad_norm_ call raises too: DTQL clips no gradient, on either side.
    """

    def __init__(self, queues: dict[str, list]):
        self.queues = {k: list(v) for k, v in queues.items()}
        self.seen_probs: list[torch.Tensor] = []

    def _pop(self, name: str, shape) -> torch.Tensor:
        queue = self.queues.get(name)
        if not queue:
            raise AssertionError(f"unexpected extra call to {name} (shape {tuple(shape)})")
        value = queue.pop(0)
        if tuple(value.shape) != tuple(shape):
            raise AssertionError(f"{name}: asked for shape {tuple(shape)}, scripted {tuple(value.shape)}")
        return value.clone()

    def randint(self, *args, **kwargs):
        ints = [a for a in args if isinstance(a, int)]
        high = kwargs.get("high", ints[1] if len(ints) >= 2 else ints[0])
        shape = kwargs["size"] if "size" in kwargs else args[-1]
        value = self._pop("randint", shape)
        if value.min() < 0 or value.max() >= high:
            raise AssertionError(f"randint: scripted values outside [0, {high})")
        return value

    def rand(self, *args, **kwargs):
        if kwargs.get("dtype") != torch.float64:
            raise AssertionError(f"rand: expected a float64 draw (the noise-level inverse CDF), got {kwargs.get('dtype')}")
        return self._pop("rand", draw_shape(args, kwargs))

    def randn(self, *args, **kwargs):
        return self._pop("randn", draw_shape(args, kwargs))

    def randn_like(self, x, **kwargs):
        return self._pop("randn_like", x.shape)

    def standard_normal(self, shape, dtype, device):
        return self._pop("standard_normal", shape)

    def multinomial(self, probs, num_samples, **kwargs):
        assert num_samples == 1
        self.seen_probs.append(probs.detach().clone())
        rows = probs.reshape(-1, probs.shape[-1]).double()
        u = self._pop("multinomial", (rows.shape[0],)).double()
        cdf = rows.cumsum(-1)
        idx = torch.searchsorted(cdf / cdf[:, -1:], u[:, None]).clamp(max=rows.shape[-1] - 1)  # [rows, 1]
        return idx.reshape(*probs.shape[:-1], 1)

    @staticmethod
    def no_clip(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ called: DTQL clips no gradient")

    @contextlib.contextmanager
    def active(self):
        normal = torch.distributions.normal
        names = ("randint", "rand", "randn", "randn_like", "multinomial")
        saved = [getattr(torch, n) for n in names] + [normal._standard_normal, torch.nn.utils.clip_grad_norm_]
        for n in names:
            setattr(torch, n, getattr(self, n))
        normal._standard_normal, torch.nn.utils.clip_grad_norm_ = self.standard_normal, self.no_clip
        try:
            yield self
        finally:
            for n, fn in zip(names, saved):
                setattr(torch, n, fn)
            normal._standard_normal, torch.nn.utils.clip_grad_norm_ = saved[-2], saved[-1]
        left = {k: len(v) for k, v in self.queues.items() if v}
        if left:
            raise AssertionError(f"scripted draws left unused: {left}")


class Taps:
    """Records, during one update: the gradients and lr at each optimizer step (a step pre-hook), the parameters after
    it (a post-hook), the outputs of chosen functions (noise levels, policy actions, MSE terms)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], names: dict[int, str]):
        self.out: dict[str, object] = {}
        self.calls: dict[str, list] = {}
        self.handles = []
        for label, opt in optimizers.items():
            self.handles.append(opt.register_step_pre_hook(self._pre(label, names)))
            self.handles.append(opt.register_step_post_hook(self._post(label, names)))

    def _pre(self, label, names):
        def hook(opt, args, kwargs):
            self.out[f"lr.{label}"] = opt.param_groups[0]["lr"]
            for p in opt.param_groups[0]["params"]:
                self.out[f"grad.{names[id(p)]}"] = p.grad.detach().clone()
        return hook

    def _post(self, label, names):
        def hook(opt, args, kwargs):
            for p in opt.param_groups[0]["params"]:
                self.out[f"param_after_step.{names[id(p)]}"] = p.detach().clone()
        return hook

    def wrap(self, owner, attr: str, label: str):
        """Record every output of owner.attr under `label` (a list, in call order); returns an undo function."""
        real, own = getattr(owner, attr), attr in vars(owner)

        def recorded(*args, **kwargs):
            out = real(*args, **kwargs)
            self.calls.setdefault(label, []).append(out.detach().clone())
            return out

        setattr(owner, attr, recorded)
        return lambda: setattr(owner, attr, real) if own else delattr(owner, attr)

    def close(self):
        for h in self.handles:
            h.remove()


def value_loss(total, q1_loss, q2_loss) -> float:
    """The value (expectile) loss as total - qf1 - qf2 in float64, on both sides alike: the official code keeps only the
    float32 total (value + qf1 + qf2), whose rounding would otherwise show as a ~1e-5 relative "difference" of the
    smaller value term. The V network's gradients, which come from this term alone, are compared exactly."""
    return float(total) - float(q1_loss) - float(q2_loss)


# ------------------------------------------------------------------------------------------------------------------
# The two sides. Each exposes named_params() -> {canonical name: tensor} (bc_model.*, actor.*, critic.*,
# critic_target.*), optimizers(), update(queues, pretraining) -> {quantity: value} and select(obs, queues, k).


class Ours:
    """The script: `build_agent`, then `train_step` and `select_actions` exactly as its main loop calls them."""

    def __init__(self, dtql, args, obs_dim: int, act_dim: int, data: dict[str, torch.Tensor], compile_losses: bool):
        self.dtql, self.args, self.data, self.step = dtql, args, data, 0
        self.agent = dtql.build_agent(args, obs_dim, act_dim, torch.device("cpu"))
        self.loss_fns, self.compiled = (dtql.critic_loss, dtql.edm_loss, dtql.policy_loss), compile_losses
        if compile_losses:  # as the script's --compile (its default)
            self.loss_fns = tuple(dtql.compile_or_eager(f) for f in self.loss_fns)
        self.q_scale = 1.0  # --perturb eval_q

    def named_params(self) -> dict[str, torch.Tensor]:
        return {f"{net}.{n}": p for net in ("bc_model", "actor", "critic", "critic_target")
                for n, p in self.agent[net].named_parameters()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic": self.agent["critic_optimizer"], "bc": self.agent["bc_optimizer"],
                "actor": self.agent["actor_optimizer"]}

    def queues(self, d: dict, pretraining: bool) -> dict[str, list]:
        """train_step: randint idx; BC: rand (sigma), randn_like (noise); policy: randn eps, rand sigma, randn noise."""
        if pretraining:
            return {"randint": [d["idx"]], "rand": [d["u_bc"]], "randn_like": [d["noise_bc"]]}
        return {"randint": [d["idx"]], "rand": [d["u_bc"], d["u_tr"]], "randn_like": [d["noise_bc"]],
                "randn": [d["eps"], d["noise_tr"]]}

    def update(self, d: dict, pretraining: bool) -> dict[str, object]:
        assert pretraining == (self.step < self.args.pretrain_steps)
        taps = Taps(self.optimizers(), {id(p): n for n, p in self.named_params().items()})
        undo = [taps.wrap(self.dtql, "sample_sigma", "sigma")]
        if not self.compiled:  # a tap inside a compiled loss would recompile it at every update: not compared then
            undo.append(taps.wrap(self.agent["actor"], "sample", "policy_action"))
        try:
            with ScriptedRNG(self.queues(d, pretraining)).active():
                losses = self.dtql.train_step(self.args, self.agent, self.data, self.step, self.loss_fns)
        finally:
            for u in undo:
                u()
            taps.close()
        self.step += 1
        out = dict(taps.out)
        total = losses["value_loss"] + losses["qf1_loss"] + losses["qf2_loss"]  # the script's critic loss, as summed
        out.update({"loss.critic": total, "loss.qf1": losses["qf1_loss"], "loss.qf2": losses["qf2_loss"],
                    "loss.value": value_loss(total, losses["qf1_loss"], losses["qf2_loss"]),
                    "loss.bc": losses["bc_loss"], "draw.sigma_bc": taps.calls["sigma"][0]})
        if not pretraining:
            out.update({"loss.trust_region": losses["trust_region_loss"], "loss.q": losses["ql_loss"],
                        "loss.nll": losses["nll_loss"], "loss.actor": losses["actor_loss"],
                        "draw.sigma_tr": taps.calls["sigma"][1]})
            if not self.compiled:
                out["policy_action"] = taps.calls["policy_action"][0]
        return out

    def eval_queues(self, d: dict) -> dict[str, list]:
        states, k, a = d["eps"].shape
        return {"randn_like": [d["eps"].reshape(states * k, a)], "multinomial": [d["u"]]}

    def select(self, obs: torch.Tensor, d: dict, k: int):
        actor, critic_target = self.agent["actor"], self.agent["critic_target"]
        taps = Taps({}, {})
        undo = [taps.wrap(actor, "sample", "candidates")]
        if self.q_scale != 1.0:
            real = critic_target.q_min
            critic_target.q_min = lambda s, a: real(s, a) * self.q_scale
            undo.append(lambda: delattr(critic_target, "q_min"))
        rng = ScriptedRNG(self.eval_queues(d))
        try:
            with rng.active():
                action = self.dtql.select_actions(actor, critic_target, obs, k)
        finally:
            for u in undo:
                u()
        return taps.calls["candidates"][0], rng.seen_probs[0], action


class Official:
    """The official DTQL agent: `pretrain(pretrain_steps=1)` / `train` once per update, `sample_action` per state."""

    def __init__(self, path: str, agent_kwargs: dict, data: dict[str, np.ndarray], start_step: int):
        load_official(path)
        from agents.dtql import DTQL
        from utils.data_sampler import Data_Sampler

        self.karras = sys.modules["diffusion.karras"]
        self.agent = DTQL(**agent_kwargs)
        self.sampler = Data_Sampler(data, "cpu", "no")  # rewards as given on both sides
        self.agent.step = start_step
        self.ema_updates = []
        real_ema = self.agent.ema.update_model_average

        def counted(ma_model, current_model):
            self.ema_updates.append(self.agent.step)
            return real_ema(ma_model, current_model)

        self.agent.ema.update_model_average = counted
        with torch.no_grad():  # never read by the official code: NaN shows it (any use would spread NaN)
            for net in (self.agent.bc_actor_target, self.agent.distill_actor_target):
                for p in net.parameters():
                    p.fill_(float("nan"))

    def named_params(self) -> dict[str, torch.Tensor]:
        a = self.agent
        return {f"{net}.{our_name(n)}": p for net, module in (("bc_model", a.bc_actor), ("actor", a.distill_actor),
                                                               ("critic", a.critic), ("critic_target", a.critic_target))
                for n, p in module.named_parameters()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        a = self.agent
        return {"critic": a.critic_optimizer, "bc": a.bc_actor_optimizer, "actor": a.distill_actor_optimizer}

    def queues(self, d: dict, pretraining: bool) -> dict[str, list]:
        """Data_Sampler: randint idx; diffusion_train_step: rand (rand_log_logistic), randn_like (noise); the policy's
        rsample: _standard_normal eps; trust region: rand, randn_like."""
        if pretraining:
            return {"randint": [d["idx"]], "rand": [d["u_bc"]], "randn_like": [d["noise_bc"]]}
        return {"randint": [d["idx"]], "rand": [d["u_bc"], d["u_tr"]], "randn_like": [d["noise_bc"], d["noise_tr"]],
                "standard_normal": [d["eps"]]}

    def update(self, d: dict, pretraining: bool) -> dict[str, object]:
        taps = Taps(self.optimizers(), {id(p): n for n, p in self.named_params().items()})
        undo = [taps.wrap(self.karras, "rand_log_logistic", "sigma"), taps.wrap(F, "mse_loss", "mse"),
                taps.wrap(self.agent.distill_actor, "sample", "policy_action")]
        batch = d["idx"].shape[0]
        try:
            with ScriptedRNG(self.queues(d, pretraining)).active():
                if pretraining:
                    self.agent.pretrain(self.sampler, batch, pretrain_steps=1)
                    metric = {}
                else:
                    metric = self.agent.train(self.sampler, batch)
        finally:
            for u in undo:
                u()
            taps.close()
        out = dict(taps.out)
        q1, q2 = taps.calls["mse"]
        # pretrain() keeps no critic loss; train() keeps it as critic_loss. Either way it is value + q1 + q2, in that
        # order (q_v_critic_loss); recomputed from the tapped terms only where the official code keeps no value.
        value = value_loss(metric["critic_loss"][0], q1, q2) if metric else None
        out.update({"loss.qf1": q1, "loss.qf2": q2, "draw.sigma_bc": taps.calls["sigma"][0], "loss.bc": self.agent.bc_loss})
        if pretraining:
            return {**out, "loss.critic": None, "loss.value": None}
        out.update({"loss.critic": metric["critic_loss"][0], "loss.value": value,
                    "loss.trust_region": metric["distill_loss"][0], "loss.q": metric["ql_loss"][0],
                    "loss.nll": metric["gamma_loss"][0], "loss.actor": metric["actor_loss"][0],
                    "draw.sigma_tr": taps.calls["sigma"][1], "policy_action": taps.calls["policy_action"][0]})
        return out

    def eval_queues(self, d: dict) -> dict[str, list]:
        return {"standard_normal": list(d["eps"]), "multinomial": [u[None] for u in d["u"]]}

    def select(self, obs: torch.Tensor, d: dict, k: int):
        """The official sample_action, one state at a time (it takes one state and repeats it `repeats` times)."""
        assert k == self.agent.repeats
        taps = Taps({}, {})
        undo = taps.wrap(self.agent.distill_actor, "sample", "candidates")
        rng = ScriptedRNG(self.eval_queues(d))
        try:
            with rng.active():
                actions = [self.agent.sample_action(o.numpy()) for o in obs]
        finally:
            undo()
        return torch.cat(taps.calls["candidates"]), torch.stack(rng.seen_probs), torch.as_tensor(np.stack(actions))


def load_official(path: str) -> None:
    """Put the official checkout on sys.path; a stand-in for einops if it is not installed (the official ScoreNetwork
    calls it only for a 0-d noise level or a batch-1 embedding, neither of which DTQL's training passes)."""
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        import einops  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("einops")

        def unused(*args, **kwargs):
            raise NotImplementedError("einops stand-in: install einops for this code path")

        stand_in.rearrange = stand_in.repeat = unused
        sys.modules["einops"] = stand_in


def official_table(path: str) -> dict:
    """The official per-task table, read (not imported: main.py imports gym and d4rl) from main.py."""
    with open(os.path.join(path, "main.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "offline_hyperparameters" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("offline_hyperparameters not found in the official main.py")


# ------------------------------------------------------------------------------------------------------------------
# Draws: one set per update, laid out for each side's call order by its `queues`.


def make_draws(gen: torch.Generator, n: int, batch: int, act_dim: int) -> dict:
    return {"idx": torch.randint(0, n, (batch,), generator=gen),
            "u_bc": torch.rand(batch, generator=gen, dtype=torch.float64),
            "noise_bc": torch.randn(batch, act_dim, generator=gen), "eps": torch.randn(batch, act_dim, generator=gen),
            "u_tr": torch.rand(batch, generator=gen, dtype=torch.float64),
            "noise_tr": torch.randn(batch, act_dim, generator=gen)}


def synthetic_data(seed: int, n: int, obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
    """A D4RL-style qlearning dataset: observations, actions in [-1, 1] (5% of the entries exactly +-1, where the NLL
    term's atanh(a / 1.001) is steepest), next_observations, rewards, terminals (1 on ~5% of the transitions)."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (n, act_dim))
    edge = rng.uniform(size=(n, act_dim)) < 0.05
    actions[edge] = np.sign(actions[edge])
    return {"observations": rng.standard_normal((n, obs_dim)).astype(np.float32),
            "actions": actions.astype(np.float32),
            "next_observations": rng.standard_normal((n, obs_dim)).astype(np.float32),
            "rewards": rng.standard_normal(n).astype(np.float32),
            "terminals": (rng.uniform(size=n) < 0.05).astype(np.float32)}


def our_data(data: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The same transitions in the script's layout (dataset_tensors' output: rewards and not_dones as [N, 1])."""
    out = {"obs": data["observations"], "next_obs": data["next_observations"], "actions": data["actions"],
           "rewards": data["rewards"][:, None], "not_dones": 1.0 - data["terminals"][:, None]}
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in out.items()}


def dims(task: str) -> tuple[int, int]:
    return DIMS[task.split("-")[0]]


def our_args(dtql, opts, total_timesteps: int, pretrain_steps: int):
    row = dtql.OFFICIAL_TASKS[opts.task]
    lr_decay = row[3] if opts.lr_decay is None else opts.lr_decay
    return dtql.resolve_preset(dtql.Args(preset=opts.task, compile=False, lr_decay=lr_decay, batch_size=opts.batch_size,
                                         total_timesteps=total_timesteps, pretrain_steps=pretrain_steps,
                                         eval_candidates=opts.eval_candidates, hidden_dim=opts.hidden_dim))[0]


def official_kwargs(args, obs_dim: int, act_dim: int) -> dict:
    """DTQL(...) as the official main.py builds it, from the same resolved row (lr_maxt = the main-loop length)."""
    return {"state_dim": obs_dim, "action_dim": act_dim, "device": "cpu", "discount": args.gamma, "lr": args.lr,
            "alpha": args.alpha, "lr_decay": args.lr_decay, "lr_maxt": args.total_timesteps,
            "expectile": args.expectile, "sigma_data": args.sigma_data, "sigma_max": args.sigma_max,
            "sigma_min": args.sigma_min, "tau": args.tau, "gamma": args.nll_weight, "repeats": args.eval_candidates,
            "action_space": types.SimpleNamespace(high=np.ones(act_dim, dtype=np.float32))}


def build(opts, dtql, official_path: str | None):
    """The two sides with identical initial weights. official_path None: the script on both sides (--self-test)."""
    obs_dim, act_dim = dims(opts.task)
    args = our_args(dtql, opts, opts.updates, opts.pretrain_updates)
    data = synthetic_data(opts.seed, opts.transitions, obs_dim, act_dim)
    torch.manual_seed(opts.seed)
    ours = Ours(dtql, args, obs_dim, act_dim, our_data(data), opts.compile)
    if official_path is None:
        other_args = args
        if opts.perturb == "tau":
            other_args = replace(args, tau=args.tau * 1.01)
        if opts.perturb == "nll_weight":
            other_args = replace(args, nll_weight=args.nll_weight + 1e-3)
        if opts.perturb == "expectile":
            other_args = replace(args, expectile=args.expectile + 1e-3)
        official = Ours(dtql, other_args, obs_dim, act_dim, our_data(data), False)
        if opts.perturb == "eval_q":
            official.q_scale = 1.01  # softmax(1.01 q): another temperature at evaluation only
    else:
        if args.hidden_dim != 256:
            raise SystemExit("the official networks are 256 wide: --hidden-dim must stay 256 with --official")
        official = Official(official_path, official_kwargs(args, obs_dim, act_dim), data, opts.start_step)
    with torch.no_grad():
        theirs = official.named_params()
        for name, p in ours.named_params().items():
            p.copy_(theirs[name])
    return ours, official, args


# ------------------------------------------------------------------------------------------------------------------
# Comparisons


def adam_moments(side) -> dict[str, torch.Tensor]:
    out = {}
    names = {id(p): n for n, p in side.named_params().items()}
    for opt in side.optimizers().values():
        for p, state in opt.state.items():
            out.update({f"{names[id(p)]}.{k}": v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")})
    return out


PER_TENSOR = False  # --per-tensor: one row per parameter tensor instead of one per network


def group(name: str) -> str:
    """Collapse per-parameter rows into one per network and kind: grad.critic.q1.0.weight -> grad: critic.q1."""
    kind, rest = name.split(".", 1)
    if PER_TENSOR:
        return f"{kind}: {rest}"
    parts = rest.split(".")
    net = ".".join(parts[:2]) if parts[0] in ("critic", "critic_target") else parts[0]
    return f"{kind}: {net}"


def compare_updates(cmp: Comparison, ours: Ours, official, opts) -> None:
    gen = torch.Generator().manual_seed(opts.seed + 1)
    obs_dim, act_dim = dims(opts.task)
    for i in range(opts.pretrain_updates + opts.updates):
        pretraining = i < opts.pretrain_updates
        d = make_draws(gen, opts.transitions, ours.args.batch_size, act_dim)
        a, b = ours.update(d, pretraining), official.update(d, pretraining)
        phase = "pretrain" if pretraining else "main"
        for key in sorted(set(a) | set(b)):
            if key == "policy_action" and ours.compiled:
                continue
            if key not in a or key not in b:
                raise AssertionError(f"{phase} update {i}: {key} recorded on one side only")
            if b[key] is None:  # official value not kept (see Official.update)
                continue
            if key.startswith(("grad.", "param_after_step.")):
                cmp.add(f"{group(key)} ({phase})", a[key], b[key])
            else:
                cmp.add(f"{key} ({phase})", a[key], b[key])
        pa, pb = ours.named_params(), official.named_params()
        for name in pa:
            if name.startswith("critic_target."):
                cmp.add(f"{group('target.' + name[len('critic_target.'):]).replace('target: ', 'target critic: ')}"
                        f" ({phase})", pa[name], pb[name])
            else:
                cmp.add(f"{group('param_after_update.' + name)} ({phase})", pa[name], pb[name])
        ma, mb = adam_moments(ours), adam_moments(official)
        if set(ma) != set(mb):
            raise AssertionError(f"{phase} update {i}: Adam state on one side only: {sorted(set(ma) ^ set(mb))}")
        for name in ma:
            param, moment = name.rsplit(".", 1)
            cmp.add(f"Adam {moment}: {group('x.' + param).split(': ')[1]} ({phase})", ma[name], mb[name])


def compare_eval(cmp: Comparison, ours: Ours, official, opts) -> None:
    gen = torch.Generator().manual_seed(opts.seed + 2)
    obs_dim, act_dim = dims(opts.task)
    obs = torch.randn(opts.eval_states, obs_dim, generator=gen)
    d = {"eps": torch.randn(opts.eval_states, opts.eval_candidates, act_dim, generator=gen),
         "u": torch.rand(opts.eval_states, generator=gen, dtype=torch.float64)}
    ca, pa, aa = ours.select(obs, d, opts.eval_candidates)
    cb, pb, ab = official.select(obs, d, opts.eval_candidates)
    cmp.add("eval: candidate actions", ca, cb)
    cmp.add("eval: softmax(min Q_target) over candidates", pa.reshape(-1), pb.reshape(-1))
    cmp.add("eval: chosen action", aa, ab)


def compare_schedule(cmp: Comparison, dtql, opts, official_path: str | None) -> None:
    """lr factor at every main-loop step of a full-length run: the official CosineAnnealingLR (T_max = epochs x
    1000), stepped once per update as its train() does, against the script's closed-form cosine_factor."""
    args = our_args(dtql, argparse.Namespace(**{**vars(opts), "lr_decay": True}), None, 0)
    total = args.total_timesteps if opts.schedule_steps is None else opts.schedule_steps
    ours = np.array([dtql.cosine_factor(m, total) for m in range(total)])
    if official_path is None:  # self-test: the closed form on both sides
        theirs = ours.copy()
    else:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
        theirs = np.empty(total)
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()` before `optimizer.step()`")
        for m in range(total):
            theirs[m] = opt.param_groups[0]["lr"]
            sched.step()
    cmp.add(f"lr factor at every step of a {total:,}-step schedule", ours, theirs)


def compare_table(cmp: Comparison, dtql, official_path: str | None) -> None:
    """The script's OFFICIAL_TASKS against the official main.py table (its -v0 antmaze rows; the -v2 rows equal them)."""
    keys = ("lr", "alpha", "gamma", "lr_decay", "num_epochs", "batch_size", "expectile")
    table = (official_table(official_path) if official_path else
             {task: dict(zip(keys, row)) for task, row in dtql.OFFICIAL_TASKS.items()})
    ours, theirs = [], []
    for task, row in table.items():
        mine = dtql.OFFICIAL_TASKS.get(task) or dtql.OFFICIAL_TASKS[task.replace("-v2", "-v0")]
        ours.append([float(v) for v in mine])
        theirs.append([float(row[k]) for k in keys])
    cmp.add(f"per-task table ({len(table)} official rows x 7 values)", np.array(ours), np.array(theirs))


def official_modules(official_path: str, obs_dim: int, act_dim: int, hidden: int) -> dict:
    load_official(official_path)
    from agents.model import Critic, DiagGaussianActorTanhAction
    from diffusion.mlps import ScoreNetwork
    return {"bc_model": lambda: ScoreNetwork(action_dim=act_dim, hidden_dim=256, time_embed_dim=16, cond_dim=obs_dim,
                                             cond_mask_prob=0.0, num_hidden_layers=4, output_dim=act_dim, device="cpu",
                                             cond_conditional=True),
            "actor": lambda: DiagGaussianActorTanhAction(state_dim=obs_dim, action_dim=act_dim, max_action=1.0),
            "critic": lambda: Critic(obs_dim, act_dim)}


def our_modules(dtql, args, obs_dim: int, act_dim: int) -> dict:
    return {"bc_model": lambda: dtql.ScoreNetwork(obs_dim, act_dim, args.hidden_dim, args.time_dim),
            "actor": lambda: dtql.Actor(obs_dim, act_dim, 1.0, args.hidden_dim),
            "critic": lambda: dtql.Critic(obs_dim, act_dim, args.hidden_dim)}


def compare_init(cmp: Comparison, dtql, opts, official_path: str | None) -> list[str]:
    """Exact: each network built under one seed on both sides. Distribution: per layer, mean and std of the weights
    and biases pooled over `init_draws` seeds of each side's whole builder (official DTQL(...), script build_agent),
    disjoint seeds; returns markdown rows (they are sampling statistics, judged against their standard errors)."""
    obs_dim, act_dim = dims(opts.task)
    args = our_args(dtql, opts, 1000, 0)
    mine = our_modules(dtql, args, obs_dim, act_dim)
    theirs = official_modules(official_path, obs_dim, act_dim, args.hidden_dim) if official_path else mine
    for net in mine:
        torch.manual_seed(opts.seed)
        a = {n: p.detach().clone() for n, p in mine[net]().named_parameters()}
        torch.manual_seed(opts.seed)
        b = {our_name(n): p.detach().clone() for n, p in theirs[net]().named_parameters()}
        if opts.perturb == "init" and net == "actor":
            b["net.0.weight"][0, 0] += 1e-3
        for name in a:
            cmp.add(f"init under one seed: {group('x.' + net + '.' + name).split(': ')[1]}", a[name], b[name])

    def pooled(build_side, seeds) -> dict[str, list[np.ndarray]]:
        out: dict[str, list[np.ndarray]] = {}
        for s in seeds:
            torch.manual_seed(s)
            for name, p in build_side().items():
                out.setdefault(name, []).append(p.detach().double().numpy().ravel())
        return {k: np.concatenate(v) for k, v in out.items()}

    def ours_side():
        agent = dtql.build_agent(args, obs_dim, act_dim, torch.device("cpu"))
        return {f"{net}.{n}": p for net in ("bc_model", "actor", "critic") for n, p in agent[net].named_parameters()}

    def official_side():
        if official_path is None:
            return ours_side()
        from agents.dtql import DTQL
        agent = DTQL(**official_kwargs(args, obs_dim, act_dim))
        return {f"{net}.{our_name(n)}": p for net, m in (("bc_model", agent.bc_actor), ("actor", agent.distill_actor),
                                                          ("critic", agent.critic)) for n, p in m.named_parameters()}

    n = opts.init_draws
    a, b = pooled(ours_side, range(1000, 1000 + n)), pooled(official_side, range(2000, 2000 + n))
    rows = ["| parameter | size | mean ours | mean official | std ours | std official | std ratio | |z| mean, std |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for name in a:
        x, y = a[name], b[name]
        if x.std() == 0 and y.std() == 0:  # constants (zero biases, LayerNorm 1 / 0): exact
            rows.append(f"| {name} | {x.size // n} | {x.mean():.4g} | {y.mean():.4g} | 0 | 0 | - | exact |")
            if x.mean() != y.mean():
                worst = float("inf")
            continue
        if x.size < 100:  # too few values for a standard error (e.g. the one-unit output biases): shown, not judged
            rows.append(f"| {name} | {x.size // n} | {x.mean():.2e} | {y.mean():.2e} | {x.std():.5f} | {y.std():.5f} | "
                        f"{x.std() / y.std():.4f} | - |")
            continue
        se_mean = math.sqrt(x.var() / x.size + y.var() / y.size)
        # std of a sample std ~ std * sqrt((kurtosis - 1) / (4 n)); kurtosis from the data, per side
        se_std = math.sqrt(sum(v.std() ** 2 * (np.mean((v - v.mean()) ** 4) / v.var() ** 2 - 1) / (4 * v.size)
                               for v in (x, y)))
        z = (abs(x.mean() - y.mean()) / se_mean, abs(x.std() - y.std()) / se_std)
        worst = max(worst, *z)
        rows.append(f"| {name} | {x.size // n} | {x.mean():.2e} | {y.mean():.2e} | {x.std():.5f} | {y.std():.5f} | "
                    f"{x.std() / y.std():.4f} | {z[0]:.1f}, {z[1]:.1f} |")
    rows.append(f"\n{n} seeds per side; |z| = |ours - official| / standard error; the largest |z| over layers with >= 100 "
                f"values is {worst:.2f} ({'within' if worst <= 5 else 'OUTSIDE'} 5 standard errors)")
    if worst > 5:
        cmp.add("init distribution: worst |z| over layers (must be <= 5)", worst, 0.0)
    return rows


def parity(opts, dtql, official_path: str | None) -> int:
    ours, official, args = build(opts, dtql, official_path)
    cmp = Comparison()
    compare_updates(cmp, ours, official, opts)
    compare_eval(cmp, ours, official, opts)
    compare_schedule(cmp, dtql, opts, official_path)
    compare_table(cmp, dtql, official_path)
    init_rows = compare_init(cmp, dtql, opts, official_path)
    side = "the script against itself (--self-test)" if official_path is None else f"official {COMMIT}"
    title = (f"dtql.py vs {side}: task {opts.task} (obs {dims(opts.task)[0]}, act {dims(opts.task)[1]}), batch "
             f"{args.batch_size}, {opts.pretrain_updates} pretraining + {opts.updates} main updates, lr_decay "
             f"{args.lr_decay} (T_max {args.total_timesteps}), compile {opts.compile}")
    code = cmp.report(title)
    if isinstance(official, Official):
        print(f"\nofficial EMA copies (NaN-filled, never read) updated at steps {official.ema_updates}")
    print("\n### Initialisation per layer, over seeds\n\n" + "\n".join(init_rows))
    return code


# ------------------------------------------------------------------------------------------------------------------
# Speed


def speed(opts, dtql, official_path: str) -> int:
    torch.set_num_threads(1)
    obs_dim, act_dim = dims(opts.task)
    args = our_args(dtql, opts, 1_000_000, 0)
    data = synthetic_data(opts.seed, opts.transitions, obs_dim, act_dim)
    torch.manual_seed(opts.seed)
    fns = {}
    if official_path is not None:
        official = Official(official_path, official_kwargs(args, obs_dim, act_dim), data, 0)
        fns["official"] = lambda: official.agent.train(official.sampler, args.batch_size)
    sides = {"dtql.py eager": Ours(dtql, args, obs_dim, act_dim, our_data(data), False)}
    if opts.compile:
        sides["dtql.py --compile"] = Ours(dtql, args, obs_dim, act_dim, our_data(data), True)
    for name, side in sides.items():
        def step(side=side):
            side.step += 1
            return dtql.train_step(side.args, side.agent, side.data, side.step, side.loss_fns)
        fns[name] = step
    cpu: dict[str, list[float]] = {name: [] for name in fns}

    def thread_timed(name, fn):  # CPU time of this thread per call: what a busy, shared machine does not inflate
        def call():
            start = time.thread_time()
            out = fn()
            cpu[name].append((time.thread_time() - start) * 1e3)
            return out
        return call

    results = time_interleaved({name: thread_timed(name, fn) for name, fn in fns.items()}, rounds=opts.rounds,
                               calls=opts.calls)
    per_round = {name: [statistics.mean(t[1 + r * opts.calls: 1 + (r + 1) * opts.calls]) for r in range(opts.rounds)]
                 for name, t in cpu.items()}  # t[0] is the warm-up call
    cpu_results = {name: (statistics.median(t), min(t), max(t)) for name, t in per_round.items()}
    print(f"## ms per DTQL main-loop update, {opts.task} (obs {obs_dim}, act {act_dim}, batch {args.batch_size}), "
          f"one thread, {opts.rounds} interleaved rounds of {opts.calls} updates\n\n{environment()}\n")
    print("Wall time (common.time_interleaved):\n\n" + speed_table(results, next(iter(fns))))
    print("\nCPU time of the thread (time.thread_time), same calls:\n\n" + speed_table(cpu_results, next(iter(fns))))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", help="a checkout of the official code at the pinned commit")
    p.add_argument("--self-test", action="store_true", help="the script on both sides (no official code needed)")
    p.add_argument("--perturb", choices=PERTURBATIONS, default="none", help="with --self-test: one planted difference")
    p.add_argument("--task", default="antmaze-large-diverse-v0", help="official task row (default: the official default)")
    p.add_argument("--lr-decay", action=argparse.BooleanOptionalAction, default=True,
                   help="cosine lr decay on (default, so the schedule is exercised) or the row's own value (--no-lr-decay)")
    p.add_argument("--updates", type=int, default=8,
                   help="main-loop updates (also the cosine T_max); 8 from --start-step 998: EMA updates at 1000 and 1005")
    p.add_argument("--pretrain-updates", type=int, default=2)
    p.add_argument("--start-step", type=int, default=998, help="official step counter at the first main update")
    p.add_argument("--batch-size", type=int, default=None, help="default: the row's")
    p.add_argument("--transitions", type=int, default=5000)
    p.add_argument("--hidden-dim", type=int, default=256, help="only with --self-test (the official nets are 256)")
    p.add_argument("--eval-states", type=int, default=4)
    p.add_argument("--eval-candidates", type=int, default=1024)
    p.add_argument("--init-draws", type=int, default=20)
    p.add_argument("--schedule-steps", type=int, default=None, help="default: the row's epochs x 1000")
    p.add_argument("--compile", action="store_true", help="the script's torch.compile'd losses (its default)")
    p.add_argument("--per-tensor", action="store_true", help="one table row per parameter tensor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed", action="store_true", help="ms per update instead of the parity tables")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=10)
    opts = p.parse_args(argv)
    if opts.lr_decay is False:
        opts.lr_decay = None  # the row's value
    if opts.perturb != "none" and not opts.self_test:
        p.error("--perturb needs --self-test")
    global PER_TENSOR
    PER_TENSOR = opts.per_tensor
    dtql = load_script("dtql")
    if opts.task not in dtql.OFFICIAL_TASKS:
        p.error(f"unknown --task {opts.task!r}")
    official_path = None if opts.self_test else require_official(opts.official, URL, COMMIT)
    torch.set_num_threads(1)
    if opts.speed:
        return speed(opts, dtql, official_path)
    return parity(opts, dtql, official_path)


if __name__ == "__main__":
    sys.exit(main())
