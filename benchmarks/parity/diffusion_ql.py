"""Parity of diffusion_ql.py with the official Diffusion-QL code, update by update, and their speed side by side.

    python benchmarks/parity/diffusion_ql.py --official Diffusion-Policies-for-Offline-RL            # parity table
    python benchmarks/parity/diffusion_ql.py --official Diffusion-Policies-for-Offline-RL --speed    # ms per update

Both implementations are built with the same shapes and the official row of one task (default: the official code's
default task, walker2d-medium-expert-v2; `--task antmaze-medium-diverse-v0` exercises the max-Q backup). The official
initial weights are copied into the script's networks; then both run `--updates` consecutive full training updates
on identical batches from one synthetic dataset, with identical random draws. The draws are injected by replacing the
RNG calls both sides make (torch.randint / randn / randn_like, np.random.uniform) with scripted queues: each queue
entry is used exactly once, its shape and range are checked, and the official per-step `randn_like` noise of the
reverse chain is served in the official loop order (t = T-1 .. 0). The official agent first runs `--warmup` (20)
updates alone; its whole state (networks, EMA actor, target critic, Adam moments and step counts) is then copied into
the script, so the compared updates start from warm Adam moments (`--warmup 0`: from fresh ones, where Adam's first
step lr * g / (|g| + 1e-8) magnifies rounding-level gradient differences of near-zero elements). The step counter of
the compared updates starts at `--start-step` (996), so the EMA actor's start (step 1000) and frequency (every 5) are
exercised, and `--lr_decay` runs with the scheduler
stepped once per update (the script's `--eval-frequency 1`, the official `train(iterations=1)`), so the cosine lr
moves at every update. Compared at every update: the loss terms, every gradient before and after clipping and the
clipped norms, every parameter and Adam moment after the step, the EMA actor and the target critic, the learning
rates. Then the evaluation action choice from identical candidates, the full-length lr schedule (lr at every
evaluation of a 2M-step run), and the initialisation (exact under one seed, and its per-layer mean/std over many
seeds).

The official code is imported from `--official` (a checkout at the pinned commit); nothing of it is copied here.
Its `main.py` (gym, d4rl) is not imported. `--self-test` runs the same comparison with the script on both sides (no
official code needed); `--perturb` plants one deliberate difference on one side, which must be reported.
"""

import argparse
import contextlib
import os
import re
import sys
import warnings
from dataclasses import replace

import numpy as np
import torch

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the repo root: the scripts share these names
from common import (Comparison, draw_shape, environment, load_script, require_official, speed_table,  # noqa: E402
                    time_interleaved)

URL = "https://github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL"
COMMIT = "d871f5c"
PERTURBATIONS = ("none", "ema_decay", "gamma", "eval_softmax")

# Official parameter names -> the script's, for the actor (Diffusion.model = MLP) and the critic (one module, two heads).
ACTOR_NAMES = {"model.time_mlp.1": "time_mlp.0", "model.time_mlp.3": "time_mlp.2", "model.mid_layer.0": "net.0",
               "model.mid_layer.2": "net.2", "model.mid_layer.4": "net.4", "model.final_layer": "net.6"}


def actor_name(official: str) -> str:
    layer, kind = official.rsplit(".", 1)
    return f"{ACTOR_NAMES[layer]}.{kind}"


def critic_name(official: str) -> tuple[str, str]:
    """q1_model.4.weight -> ("qf1", "net.4.weight")."""
    head, rest = official.split(".", 1)
    return {"q1_model": "qf1", "q2_model": "qf2"}[head], f"net.{rest}"


# ------------------------------------------------------------------------------------------------------------------
# Scripted random draws


class ScriptedRNG:
    """Replaces torch.randint / randn / randn_like, np.random.uniform and torch.multinomial by queues of given values.

    `queues` maps a function name to a list of values (tensors, or floats for "uniform"); every call pops the next one
    and checks its shape (and, for randint, the range asked for). `multinomial` entries are uniforms u in [0, 1): the
    index returned is the inverse CDF of the given probabilities at u, so identical probabilities give identical
    picks. Leaving the context with a value unused, or calling with an empty queue, raises.
    """

    def __init__(self, queues: dict[str, list]):
        self.queues = {k: list(v) for k, v in queues.items()}
        self.seen_probs: list[torch.Tensor] = []

    def _pop(self, name: str, shape=None):
        queue = self.queues.get(name)
        if not queue:
            raise AssertionError(f"unexpected extra call to {name} (shape {shape})")
        value = queue.pop(0)
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise AssertionError(f"{name}: asked for shape {tuple(shape)}, scripted {tuple(value.shape)}")
        return value

    def randint(self, *args, **kwargs):
        high = args[1] if len(args) >= 2 and isinstance(args[1], int) else kwargs.get("high", args[0])
        shape = kwargs["size"] if "size" in kwargs else args[-1]
        value = self._pop("randint", shape)
        if value.max() >= high or value.min() < 0:
            raise AssertionError(f"randint: scripted values outside [0, {high})")
        return value.clone()

    def randn(self, *args, **kwargs):
        return self._pop("randn", draw_shape(args, {k: v for k, v in kwargs.items() if k == "size"})).clone()

    def randn_like(self, x, **kwargs):
        return self._pop("randn_like", x.shape).clone()

    def uniform(self, *args, **kwargs):
        if args or kwargs:
            raise AssertionError("np.random.uniform called with arguments")
        return self._pop("uniform")

    def multinomial(self, probs, num_samples, **kwargs):
        assert num_samples == 1
        self.seen_probs.append(probs.detach().clone())
        rows = probs.reshape(-1, probs.shape[-1])
        u = torch.as_tensor([self._pop("multinomial") for _ in range(rows.shape[0])], dtype=torch.float64)
        cdf = rows.double().cumsum(-1)
        idx = torch.searchsorted(cdf / cdf[:, -1:], u[:, None]).clamp(max=rows.shape[-1] - 1)  # [rows, 1]
        return idx.reshape(*probs.shape[:-1], 1)

    @contextlib.contextmanager
    def active(self):
        saved = (torch.randint, torch.randn, torch.randn_like, np.random.uniform, torch.multinomial)
        torch.randint, torch.randn, torch.randn_like = self.randint, self.randn, self.randn_like
        np.random.uniform, torch.multinomial = self.uniform, self.multinomial
        try:
            yield self
        finally:
            torch.randint, torch.randn, torch.randn_like, np.random.uniform, torch.multinomial = saved
        left = {k: len(v) for k, v in self.queues.items() if v}
        if left:
            raise AssertionError(f"scripted draws left unused: {left}")


class GradRecorder:
    """Wraps torch.nn.utils.clip_grad_norm_ to record every gradient before and after clipping, and the norm."""

    def __init__(self, names: dict[int, str]):
        self.names = names  # id(parameter) -> canonical name
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.norms: list[torch.Tensor] = []

    @contextlib.contextmanager
    def active(self):
        real = torch.nn.utils.clip_grad_norm_

        def clip(parameters, max_norm, *args, **kwargs):
            parameters = list(parameters)
            self.before.update({self.names[id(p)]: p.grad.detach().clone() for p in parameters})
            norm = real(parameters, max_norm, *args, **kwargs)
            self.after.update({self.names[id(p)]: p.grad.detach().clone() for p in parameters})
            self.norms.append(norm.detach().clone())
            return norm

        torch.nn.utils.clip_grad_norm_ = clip
        try:
            yield self
        finally:
            torch.nn.utils.clip_grad_norm_ = real


# ------------------------------------------------------------------------------------------------------------------
# The two sides. Each exposes: params() -> {canonical name: tensor} (actor.*, ema_actor.*, qf1.*, qf2.*, qf1_target.*,
# qf2_target.*), adam_state(), update(queues) -> {quantity: value} and select(obs, queues) -> (candidates, probs,
# action). The scripted queues are built per side by `draws_for` from one set of draws.


class Ours:
    """The script: `train_step` and `select_actions` exactly as its main loop calls them."""

    queues = staticmethod(lambda d: ours_queues(d))
    eval_queues = staticmethod(lambda d: ours_eval_queues(d))

    def __init__(self, dql, args, obs_dim: int, act_dim: int, data: dict[str, torch.Tensor], start_step: int,
                 compile_losses: bool = False):
        self.dql, self.args, self.data, self.step = dql, args, data, start_step
        self.nets, self.q_optimizer, self.actor_optimizer, self.schedule = dql.build_agent(
            args, obs_dim, act_dim, torch.device("cpu"))
        self.critic_fn, self.actor_fn = dql.critic_losses, dql.actor_losses
        if compile_losses:  # as the script's --compile (its default)
            self.critic_fn, self.actor_fn = dql.compile_or_eager(dql.critic_losses), dql.compile_or_eager(dql.actor_losses)

    def named_params(self) -> dict[str, torch.Tensor]:
        return {f"{net}.{n}": p for net, module in self.nets.items() for n, p in module.named_parameters()}

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.named_params().items()}

    def adam_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.named_params().items():
            for opt in (self.q_optimizer, self.actor_optimizer):
                if p in opt.state:
                    out.update({f"{name}.{k}": v.clone() for k, v in opt.state[p].items() if k != "step"})
        return out

    def update(self, queues: dict[str, list], record: bool = True) -> dict[str, object] | None:
        recorder = GradRecorder({id(p): n for n, p in self.named_params().items()})
        with ScriptedRNG(queues).active(), recorder.active() if record else contextlib.nullcontext():
            qf1_loss, qf2_loss, _, _, actor_loss, bc_loss, ql_loss = self.dql.train_step(
                self.args, self.nets, self.q_optimizer, self.actor_optimizer, self.schedule, self.data, self.step,
                "torch", self.critic_fn, self.actor_fn)
        self.step += 1
        if not record:
            return None
        return {"critic_loss": qf1_loss + qf2_loss, "bc_loss": bc_loss, "ql_loss": ql_loss, "actor_loss": actor_loss,
                "lr_actor": self.actor_optimizer.param_groups[0]["lr"],
                "lr_critic": self.q_optimizer.param_groups[0]["lr"],
                "grad_norm_critic": recorder.norms[0], "grad_norm_actor": recorder.norms[1],
                "grad_before_clip": recorder.before, "grad_after_clip": recorder.after}

    def select(self, obs: torch.Tensor, queues: dict[str, list], candidates: int):
        rng, seen = ScriptedRNG(queues), []
        real = self.dql.sample_actions

        def record(*args, **kwargs):
            seen.append(real(*args, **kwargs))
            return seen[-1]

        self.dql.sample_actions = record
        try:
            with rng.active():
                action = self.dql.select_actions(self.nets, self.schedule, obs, candidates, "torch")
        finally:
            self.dql.sample_actions = real
        return seen[0], rng.seen_probs[0], action


class Official:
    """The official Diffusion_QL agent, trained one `train(iterations=1)` call per update."""

    queues = staticmethod(lambda d: official_queues(d))
    eval_queues = staticmethod(lambda d: official_eval_queues(d))

    def __init__(self, path: str, agent_kwargs: dict, data: dict[str, np.ndarray], start_step: int):
        if path not in sys.path:
            sys.path.insert(0, path)
        from agents.ql_diffusion import Diffusion_QL
        from utils.data_sampler import Data_Sampler

        self.agent = Diffusion_QL(**agent_kwargs)
        self.sampler = Data_Sampler(data, "cpu", "no")  # rewards as given (the transforms are tested elsewhere)
        self.agent.step = start_step
        if self.agent.lr_decay:  # the schedulers stepped once per earlier train(iterations=1) call
            for _ in range(start_step):
                self.agent.actor_lr_scheduler.step()
                self.agent.critic_lr_scheduler.step()

    def named_params(self) -> dict[str, torch.Tensor]:
        a = self.agent
        out = {f"actor.{actor_name(n)}": p for n, p in a.actor.named_parameters()}
        out.update({f"ema_actor.{actor_name(n)}": p for n, p in a.ema_model.named_parameters()})
        for prefix, critic in (("", a.critic), ("_target", a.critic_target)):
            for n, p in critic.named_parameters():
                head, rest = critic_name(n)
                out[f"{head}{prefix}.{rest}"] = p
        return out

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.named_params().items()}

    def adam_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.named_params().items():
            for opt in (self.agent.critic_optimizer, self.agent.actor_optimizer):
                if p in opt.state:
                    out.update({f"{name}.{k}": v.clone() for k, v in opt.state[p].items() if k != "step"})
        return out

    def update(self, queues: dict[str, list], record: bool = True) -> dict[str, object] | None:
        recorder = GradRecorder({id(p): n for n, p in self.named_params().items()})
        lrs = (self.agent.actor_optimizer.param_groups[0]["lr"], self.agent.critic_optimizer.param_groups[0]["lr"])
        with ScriptedRNG(queues).active(), recorder.active() if record else contextlib.nullcontext():
            metric = self.agent.train(self.sampler, iterations=1, batch_size=queues["randint"][0].shape[0])
        if not record:
            return None
        return {"critic_loss": metric["critic_loss"][0], "bc_loss": metric["bc_loss"][0],
                "ql_loss": metric["ql_loss"][0], "actor_loss": metric["actor_loss"][0],
                "lr_actor": lrs[0], "lr_critic": lrs[1],
                "grad_norm_critic": recorder.norms[0], "grad_norm_actor": recorder.norms[1],
                "grad_before_clip": recorder.before, "grad_after_clip": recorder.after}

    def select(self, obs: torch.Tensor, queues: dict[str, list], candidates: int):
        """The official sample_action, one state at a time (it takes one state and repeats it 50 times)."""
        assert candidates == 50, "the official sample_action hard-codes 50 candidates"
        rng, seen = ScriptedRNG(queues), []
        real = self.agent.actor.sample

        def record(*args, **kwargs):
            seen.append(real(*args, **kwargs))
            return seen[-1]

        self.agent.actor.sample = record
        try:
            with rng.active():
                actions = [self.agent.sample_action(o.numpy()) for o in obs]
        finally:
            del self.agent.actor.sample
        return torch.cat(seen), torch.cat(rng.seen_probs), torch.as_tensor(np.stack(actions))


# ------------------------------------------------------------------------------------------------------------------
# Draws: one set per update, laid out for each side's call order.


def make_draws(gen: torch.Generator, n: int, batch: int, backup: int, steps: int, act_dim: int) -> dict:
    b_k = batch * backup
    return {"idx": torch.randint(0, n, (batch,), generator=gen), "critic_x": torch.randn(b_k, act_dim, generator=gen),
            "critic_noise": torch.randn(steps, b_k, act_dim, generator=gen),
            "t": torch.randint(0, steps, (batch,), generator=gen), "eps": torch.randn(batch, act_dim, generator=gen),
            "actor_x": torch.randn(batch, act_dim, generator=gen),
            "actor_noise": torch.randn(steps, batch, act_dim, generator=gen),
            "u": float(torch.rand((), generator=gen, dtype=torch.float64))}


def ours_queues(d: dict) -> dict[str, list]:
    """train_step: randint idx, randn x_T and [T, N, A] noise (critic chain), randint t, randn eps, randn x_T and noise
    (actor chain), np.random.uniform head pick."""
    return {"randint": [d["idx"], d["t"]], "uniform": [d["u"]],
            "randn": [d["critic_x"], d["critic_noise"], d["eps"], d["actor_x"], d["actor_noise"]]}


def official_queues(d: dict) -> dict[str, list]:
    """Diffusion_QL.train: randint idx (Data_Sampler), randn x_T then randn_like per reverse step t = T-1..0 (EMA chain,
    the t = 0 draw is masked out), randint t and randn_like eps (p_losses), the actor chain likewise, uniform."""
    steps = d["critic_noise"].shape[0]
    return {"randint": [d["idx"], d["t"]], "uniform": [d["u"]], "randn": [d["critic_x"], d["actor_x"]],
            "randn_like": [*(d["critic_noise"][t] for t in reversed(range(steps))), d["eps"],
                           *(d["actor_noise"][t] for t in reversed(range(steps)))]}


def eval_draws(gen: torch.Generator, states: int, candidates: int, steps: int, act_dim: int) -> dict:
    return {"x": torch.randn(states, candidates, act_dim, generator=gen),
            "noise": torch.randn(steps, states, candidates, act_dim, generator=gen),
            "u": torch.rand(states, generator=gen, dtype=torch.float64).tolist()}


def ours_eval_queues(d: dict) -> dict[str, list]:
    states, k, a = d["x"].shape
    return {"randn": [d["x"].reshape(states * k, a), d["noise"].reshape(-1, states * k, a)], "multinomial": d["u"]}


def official_eval_queues(d: dict) -> dict[str, list]:
    steps = d["noise"].shape[0]
    like = [d["noise"][t, s] for s in range(d["x"].shape[0]) for t in reversed(range(steps))]
    return {"randn": list(d["x"]), "randn_like": like, "multinomial": d["u"]}


# ------------------------------------------------------------------------------------------------------------------


def synthetic_data(seed: int, n: int, obs_dim: int, act_dim: int, overshoot: float) -> dict[str, np.ndarray]:
    """A D4RL-style qlearning dataset: observations, actions (in [-1 - overshoot, 1 + overshoot]), next_observations,
    rewards, terminals (1 on ~5% of the transitions)."""
    rng = np.random.default_rng(seed)
    return {"observations": rng.standard_normal((n, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-1 - overshoot, 1 + overshoot, (n, act_dim)).astype(np.float32),
            "next_observations": rng.standard_normal((n, obs_dim)).astype(np.float32),
            "rewards": rng.standard_normal(n).astype(np.float32),
            "terminals": (rng.uniform(size=n) < 0.05).astype(np.float32)}


def our_data(dql, data: dict[str, np.ndarray], clip_actions: bool) -> dict[str, torch.Tensor]:
    """The same transitions in the script's layout; actions through the script's own rescaling (the identity for the
    official [-1, 1] box), and optionally the clip the script used to apply."""
    actions = dql.rescale_actions(data["actions"], -np.ones(data["actions"].shape[1]), np.ones(data["actions"].shape[1]))
    if clip_actions:
        actions = np.clip(actions, -1.0, 1.0)
    out = {"obs": data["observations"], "next_obs": data["next_observations"], "actions": actions,
           "rewards": data["rewards"], "not_dones": 1.0 - data["terminals"]}
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in out.items()}


def copy_official_weights(ours: Ours, official_params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in ours.named_params().items():
            p.copy_(official_params[name])


def build(opts, dql, official_path: str | None):
    """The two sides with identical initial weights. official_path None: the script on both sides (--self-test)."""
    obs_dim, act_dim = opts.obs_dim, opts.act_dim
    task_row = dql.OFFICIAL_TASKS[opts.task]
    lr, eta, max_q_backup, reward_tune, epochs, grad_norm = task_row
    args = dql.resolve_preset(dql.Args(preset=opts.task, compile=False, kernels="torch", lr_decay=opts.lr_decay,
                                       eval_frequency=1, batch_size=opts.batch_size))[0]
    data = synthetic_data(opts.seed, opts.transitions, obs_dim, act_dim, opts.action_overshoot)
    torch.manual_seed(opts.seed)
    ours = Ours(dql, args, obs_dim, act_dim, our_data(dql, data, opts.clip_actions), opts.start_step,
                opts.compile and not opts.speed)
    if official_path is None:
        other_args = args
        if opts.perturb == "ema_decay":
            other_args = replace(args, ema_decay=0.99)  # official 0.995
        if opts.perturb == "gamma":
            other_args = replace(args, gamma=args.gamma * (1 + 1e-4))
        official = Ours(dql, other_args, obs_dim, act_dim, our_data(dql, data, False), opts.start_step)
        copy_official_weights(official, ours.params())
        if opts.perturb == "eval_softmax":  # a temperature of 1.01 in the evaluation softmax
            real_softmax = torch.softmax
            dql_other = official.dql
            official.select = perturbed_select(official.select, dql_other, real_softmax)
        return ours, official, args
    kwargs = dict(state_dim=obs_dim, action_dim=act_dim, max_action=1.0, device="cpu", discount=args.gamma,
                  tau=args.tau, max_q_backup=max_q_backup, beta_schedule="vp", n_timesteps=args.diffusion_steps, eta=eta,
                  lr=lr, lr_decay=opts.lr_decay, lr_maxt=epochs, grad_norm=grad_norm)
    torch.manual_seed(opts.seed)
    official = Official(official_path, kwargs, data, opts.start_step - opts.warmup)
    if opts.warmup:  # official updates only, then its whole training state is copied: warm Adam moments
        gen = torch.Generator().manual_seed(opts.seed + 5)
        backup = args.max_q_backup_samples if args.max_q_backup else 1
        for _ in range(opts.warmup):
            official.update(official.queues(make_draws(gen, opts.transitions, args.batch_size, backup,
                                                       args.diffusion_steps, act_dim)), record=False)
        copy_adam_state(ours, official)
    copy_official_weights(ours, official.params())
    if opts.align_coefficients:
        align_coefficients(ours.schedule, official.agent.actor)
    return ours, official, args


def copy_adam_state(ours: Ours, official: Official) -> None:
    """The official Adam moments and step counts into the script's optimizers, parameter by parameter."""
    mine = ours.named_params()
    for name, p in official.named_params().items():
        for opt, my_opt in ((official.agent.critic_optimizer, ours.q_optimizer),
                            (official.agent.actor_optimizer, ours.actor_optimizer)):
            if p in opt.state:
                my_opt.state[mine[name]] = {k: v.clone() for k, v in opt.state[p].items()}


def align_coefficients(schedule, diffusion) -> None:
    """Give the script's schedule the official float32 coefficients (computed in float32 from float32 betas) instead
    of its float64-computed ones cast to float32; the posterior std as the official p_sample computes it."""
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        setattr(schedule, name, getattr(diffusion, name).detach().clone())
    std = (0.5 * diffusion.posterior_log_variance_clipped).exp()
    schedule.posterior_std = std
    schedule.steps = list(zip(*(v.tolist() for v in (diffusion.sqrt_recip_alphas_cumprod,
                                                     diffusion.sqrt_recipm1_alphas_cumprod,
                                                     diffusion.posterior_mean_coef1, diffusion.posterior_mean_coef2,
                                                     std))))


def perturbed_select(select, dql, real_softmax):
    def call(obs, queues, candidates):
        torch.softmax = lambda q, dim: real_softmax(q / 1.01, dim=dim)
        try:
            return select(obs, queues, candidates)
        finally:
            torch.softmax = real_softmax

    return call


def add_grouped(cmp: Comparison, prefix: str, ours: dict, official: dict) -> None:
    """One row per network (actor, ema_actor, qf1, ...): per-tensor differences, the max over the tensors."""
    if set(ours) != set(official):
        raise ValueError(f"{prefix}: keys differ: {sorted(set(ours) ^ set(official))}")
    for key in ours:
        net = key.split(".", 1)[0]
        count = sum(k.split(".", 1)[0] == net for k in ours)
        cmp.add(f"{prefix}: {net} ({count} tensors)", ours[key], official[key])


def compare_updates(opts, ours, official, args, cmp: Comparison) -> None:
    add_grouped(cmp, "start state (copied from the official)", ours.params(), official.params())
    gen = torch.Generator().manual_seed(opts.seed + 1)
    backup = args.max_q_backup_samples if args.max_q_backup else 1
    n = ours.data["obs"].shape[0]
    for _ in range(opts.updates):
        d = make_draws(gen, n, args.batch_size, backup, args.diffusion_steps, opts.act_dim)
        ema_before = {k: v for k, v in ours.params().items() if k.startswith("ema_actor.")}
        mine, theirs = ours.update(ours.queues(d)), official.update(official.queues(d))
        for key in ("critic_loss", "bc_loss", "ql_loss", "actor_loss", "lr_actor", "lr_critic", "grad_norm_critic",
                    "grad_norm_actor"):
            cmp.add(key, mine[key], theirs[key])
        add_grouped(cmp, "grad before clip", mine["grad_before_clip"], theirs["grad_before_clip"])
        add_grouped(cmp, "grad after clip", mine["grad_after_clip"], theirs["grad_after_clip"])
        after = ours.params()
        add_grouped(cmp, "param after step", after, official.params())
        add_grouped(cmp, "Adam moments", ours.adam_state(), official.adam_state())
        moved = any(not torch.equal(after[k], v) for k, v in ema_before.items())
        expected = ours.step - 1 >= args.ema_start and (ours.step - 1) % args.ema_frequency == 0
        cmp.add("EMA moved at the official steps", float(moved != expected), 0.0)
        opts.ema_steps += [ours.step - 1] if moved else []


def compare_eval(opts, ours, official, args, cmp: Comparison) -> None:
    gen = torch.Generator().manual_seed(opts.seed + 2)
    obs = torch.as_tensor(np.random.default_rng(opts.seed + 3).standard_normal((opts.eval_states, opts.obs_dim)),
                          dtype=torch.float32)
    for _ in range(3):
        d = eval_draws(gen, opts.eval_states, 50, args.diffusion_steps, opts.act_dim)
        c1, p1, a1 = ours.select(obs, ours.eval_queues(d), 50)
        c2, p2, a2 = official.select(obs, official.eval_queues(d), 50)
        cmp.add("eval: 50 candidates per state", c1, c2)
        cmp.add("eval: softmax(min Q_target) over candidates", p1.reshape(-1), p2.reshape(-1))
        cmp.add("eval: chosen action", a1, a2)


def compare_lr_schedule(dql, task: str, cmp: Comparison) -> None:
    """lr factor at every evaluation of a full official-length run (eval every 50k steps), vs CosineAnnealingLR."""
    epochs = dql.OFFICIAL_TASKS[task][4]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    ours, theirs = [], []
    for step in range(0, epochs * 1000, 50_000):  # the official train() call that starts at `step`
        ours.append(dql.lr_factor(step, True, 50_000, epochs * 1000))
        theirs.append(opt.param_groups[0]["lr"])
        scheduler.step()
    cmp.add(f"lr factor at each evaluation of a {epochs}k-step run", ours, theirs)


def compare_init(opts, dql, official_path: str | None, cmp: Comparison) -> str:
    """Exact: under one seed, our Denoiser/QNetworks equal the official MLP/Critic. Statistical: per-layer mean and std
    over `init_draws` seeds each (different seeds per side), as a separate table of z-scores."""
    obs_dim, act_dim = opts.obs_dim, opts.act_dim

    def ours_nets(seed):
        torch.manual_seed(seed)
        actor = dql.Denoiser(obs_dim, act_dim, 256, 16, 5)
        qf1, qf2 = dql.QNetwork(obs_dim, act_dim, 256), dql.QNetwork(obs_dim, act_dim, 256)
        out = {f"actor.{n}": p for n, p in actor.named_parameters()}
        out.update({f"{h}.{n}": p for h, q in (("qf1", qf1), ("qf2", qf2)) for n, p in q.named_parameters()})
        return out

    if official_path is None:
        theirs_nets = ours_nets
    else:
        from agents.model import MLP
        from agents.ql_diffusion import Critic

        def theirs_nets(seed):
            torch.manual_seed(seed)
            model = MLP(obs_dim, act_dim, "cpu")
            critic = Critic(obs_dim, act_dim)
            out = {f"actor.{actor_name('model.' + n)}": p for n, p in model.named_parameters()}
            for n, p in critic.named_parameters():
                head, rest = critic_name(n)
                out[f"{head}.{rest}"] = p
            return out

    add_grouped(cmp, "init under one seed", ours_nets(opts.seed), theirs_nets(opts.seed))
    draws = opts.init_draws
    a = {k: [] for k in ours_nets(0)}
    b = {k: [] for k in a}
    for i in range(draws):
        for k, v in ours_nets(1000 + i).items():
            a[k].append(v.detach().double().reshape(-1))
        for k, v in theirs_nets(100_000 + i).items():
            b[k].append(v.detach().double().reshape(-1))
    lines = ["| parameter | fan-in | mean ours / official (z) | std ours / official (z) | U(+-1/sqrt(fan-in)) std |",
             "|---|---:|---:|---:|---:|"]
    worst, shapes = 0.0, {k: v.shape for k, v in ours_nets(0).items()}
    for k in a:
        x, y = torch.cat(a[k]), torch.cat(b[k])
        se_mean = (x.var() / x.numel() + y.var() / y.numel()).sqrt()
        z_mean = float((x.mean() - y.mean()) / se_mean)

        def se_std(v):  # delta method: Var(s) ~ (m4 - s^4) / (4 n s^2)
            s2 = v.var()
            return ((((v - v.mean()) ** 4).mean() - s2**2) / (4 * v.numel() * s2)).sqrt()

        z_std = float((x.std() - y.std()) / (se_std(x) ** 2 + se_std(y) ** 2).sqrt())
        worst = max(worst, abs(z_mean), abs(z_std))
        name = k.rsplit(".", 1)[0] + ".weight"
        fan_in = shapes[name][1]
        lines.append(f"| {k} | {fan_in} | {x.mean():.2e} / {y.mean():.2e} ({z_mean:+.1f}) | {x.std():.5f} / "
                     f"{y.std():.5f} ({z_std:+.1f}) | {1 / np.sqrt(3 * fan_in):.5f} |")
    verdict = "within sampling noise (all |z| < 5)" if worst < 5 else f"**differ** (max |z| = {worst:.1f})"
    opts.init_ok = worst < 5
    return (f"Initialisation distribution over {draws} seeds per side (z = difference / its standard error): "
            f"{verdict}\n\n" + "\n".join(lines))


def speed(opts, ours, official, args) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(opts.seed + 4)
    backup = args.max_q_backup_samples if args.max_q_backup else 1
    n = ours.data["obs"].shape[0]

    pool = [make_draws(gen, n, args.batch_size, backup, args.diffusion_steps, opts.act_dim) for _ in range(8)]

    def step(side):
        count = [0]

        def call():  # the draws were made beforehand; only the queue lists are built here
            count[0] += 1
            side.update(side.queues(pool[count[0] % len(pool)]), record=False)

        return call

    sides = {"official": step(official), "diffusion_ql.py --no-compile": step(ours)}
    if opts.compile:  # the script's default: compiled losses (the harness's `ours` is eager unless --compile)
        compiled = Ours(ours.dql, args, opts.obs_dim, opts.act_dim, ours.data, ours.step, compile_losses=True)
        copy_official_weights(compiled, ours.params())
        sides["diffusion_ql.py (--compile, default)"] = step(compiled)
    results = time_interleaved(sides, rounds=opts.rounds, calls=opts.calls)
    print(f"## Diffusion-QL: ms per training update on CPU, one thread, batch {args.batch_size}, task {opts.task}\n\n"
          f"{environment()}\n\n{speed_table(results, 'official')}\n\n({opts.rounds} interleaved rounds of "
          f"{opts.calls} updates each; the draws are made outside the timed code in both cases)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", help="checkout of Zhendong-Wang/Diffusion-Policies-for-Offline-RL at d871f5c")
    p.add_argument("--self-test", action="store_true", help="the script on both sides (no official code needed)")
    p.add_argument("--perturb", choices=PERTURBATIONS, default="none",
                   help="with --self-test: plant one difference on one side (must be reported)")
    p.add_argument("--task", default="walker2d-medium-expert-v2", help="official row (the official default task)")
    p.add_argument("--obs-dim", type=int, default=17)
    p.add_argument("--act-dim", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--transitions", type=int, default=10_000)
    p.add_argument("--updates", type=int, default=10)
    p.add_argument("--start-step", type=int, default=996, help="step counter of the first update (EMA starts at 1000)")
    p.add_argument("--warmup", type=int, default=20,
                   help="official-only updates before the compared ones, whose state (Adam moments included) is "
                        "then copied into the script: the compared updates start from warm Adam moments")
    p.add_argument("--no-lr-decay", dest="lr_decay", action="store_false")
    p.add_argument("--eval-states", type=int, default=8)
    p.add_argument("--init-draws", type=int, default=100)
    p.add_argument("--action-overshoot", type=float, default=0.0,
                   help="dataset actions drawn from [-1-x, 1+x] (D4RL data can leave the box slightly)")
    p.add_argument("--clip-actions", action="store_true",
                   help="clip our dataset actions to [-1, 1] (the script's former behaviour) to measure what it does")
    p.add_argument("--align-coefficients", action="store_true",
                   help="give the script the official float32 DDPM coefficients (the script computes them in float64)")
    p.add_argument("--compile", action="store_true",
                   help="compile our losses as the script's --compile does (with --speed: an extra row)")
    p.add_argument("--speed", action="store_true", help="time official vs script updates instead of comparing")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args(argv)
    # the official sample_action's F.softmax without dim, and the schedulers stepped without an optimizer step here
    warnings.filterwarnings("ignore", message="Implicit dimension choice for softmax")
    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
    opts.ema_steps, opts.init_ok = [], True
    path = None if opts.self_test else require_official(opts.official, URL, COMMIT)
    if opts.perturb != "none" and not opts.self_test:
        p.error("--perturb needs --self-test")
    torch.set_num_threads(1)
    dql = load_script("diffusion_ql")
    ours, official, args = build(opts, dql, path)
    if opts.speed:
        speed(opts, ours, official, args)
        return 0
    cmp = Comparison()
    compare_updates(opts, ours, official, args, cmp)
    compare_eval(opts, ours, official, args, cmp)
    compare_lr_schedule(dql, opts.task, cmp)
    init_text = compare_init(opts, dql, path, cmp)
    title = (f"Diffusion-QL parity: diffusion_ql.py vs {'itself' if path is None else 'official @ ' + COMMIT}, task "
             f"{opts.task}, {opts.updates} updates from step {opts.start_step}"
             + (f" after {opts.warmup} official warm-up updates" if opts.warmup else "")
             + f" (EMA moved at steps {opts.ema_steps})"
             + (f", perturbation {opts.perturb}" if opts.perturb != "none" else "")
             + (", official float32 coefficients in the script" if opts.align_coefficients else "")
             + (f", dataset actions in [-{1 + opts.action_overshoot:g}, {1 + opts.action_overshoot:g}]"
                if opts.action_overshoot else "")
             + (", the script's dataset actions clipped to [-1, 1]" if opts.clip_actions else "")
             + (", compiled losses" if opts.compile else ""))
    code = cmp.report(title)
    print(init_text)
    return code if opts.init_ok else 1


if __name__ == "__main__":
    sys.exit(main())
