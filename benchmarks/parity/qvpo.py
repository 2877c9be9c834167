"""qvpo.py against the official QVPO code (wadx2019/qvpo @ 40a1974), update by update, and side by side on speed.

Both agents are built with the official default shapes and hyper-parameters (`main.py --weighted --aug`, Hopper's
11-d observations and 3-d actions), the official initial weights are copied into the script's networks, both replay
buffers hold the same transitions, and every random draw of an update (replay indices, x_T and the per-step noise of
each reverse chain, the uniform entropy-row actions, the diffusion step t and the noise of the loss) is generated here
and handed to both sides by patching the RNG calls each side makes; a side that makes a draw in another order or shape
fails loudly. Then, at every one of --updates consecutive updates, each loss term, each gradient before and after the
norm clip, each parameter after its optimizer step, the target networks after the EMA, the running Q statistics, the
learning rates and omega are compared; after the updates, the behaviour and evaluation action choices given identical
candidates; and separately the initial weight distribution of every layer over many draws of the official initializer.

The script deliberately bootstraps through time-limit truncations, which the official gym-0.21 loop stores as terminal
(mask = 0). That fix lives in what the script's buffer stores, not in the update, so by default the harness stores the
official flag (terminated or truncated) in the script's buffer too: then the two updates must agree everywhere.
--keep-truncation-fix stores what qvpo.py stores (terminated only) and shows that the TD target then differs exactly
on the truncated rows, by gamma * min Q'(s', a'), and nowhere else.

    python benchmarks/parity/qvpo.py --official PATH            # parity table (exit 1 on any mismatch)
    python benchmarks/parity/qvpo.py --official PATH --keep-truncation-fix
    python benchmarks/parity/qvpo.py --official PATH --speed    # ms per update, official vs script, one thread
"""

import argparse
import contextlib
import importlib.util
import math
import os
import sys
import types
from dataclasses import dataclass

import numpy as np
import torch

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the repo root: the scripts share these names
import common  # noqa: E402

URL, COMMIT = "https://github.com/wadx2019/qvpo", "40a1974"
OBS_DIM, ACT_DIM = 11, 3  # Hopper (the official default env), v3 and v5 alike
NUM_UNIFORM = 10  # hard-coded in the official train()
START_STEP = 20_000  # env step of the first compared update: past the 10k warm-up, so omega follows its steady rule
DATA_SIZE = 4096  # transitions in both replay buffers
TRUNCATED_P = TERMINATED_P = 0.05  # fraction of time-limit-truncated and of terminated transitions in the buffer


# ----------------------------------------------------------------------------------------------------------------------
# Random draws: generated once here, handed to both sides through their own RNG calls
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class UpdateDraws:
    """Every random number one QVPO update consumes, in a layout-neutral form (per state b, per candidate k)."""

    critic_idx: torch.Tensor  # [B] replay rows of the critic batch
    target_x: torch.Tensor  # [B, K_t, A] x_T of the target chain
    target_noise: torch.Tensor  # [T, B, K_t, A] noise added at step t (t = 0's is drawn by the official, unused)
    actor_idx: torch.Tensor  # [B] replay rows of the actor batch
    train_x: torch.Tensor  # [B, N_d, A]
    train_noise: torch.Tensor  # [T, B, N_d, A]
    uniform: torch.Tensor  # [N_e B, A] uniform actions in [-1, 1], row j B + b belongs to state b (both layouts)
    loss_t: torch.Tensor  # [(1 + N_e) B] diffusion step of each loss row
    loss_eps: torch.Tensor  # [(1 + N_e) B, A] noise of each loss row


def chain_draws(gen: torch.Generator, T: int, batch: int, samples: int, act_dim: int):
    return torch.randn(batch, samples, act_dim, generator=gen), torch.randn(T, batch, samples, act_dim, generator=gen)


def make_update_draws(gen: torch.Generator, data_size: int, batch: int, T: int, target_samples: int, train_samples: int,
                      act_dim: int, num_uniform: int) -> UpdateDraws:
    critic_idx = torch.randint(0, data_size, (batch,), generator=gen)
    target_x, target_noise = chain_draws(gen, T, batch, target_samples, act_dim)
    actor_idx = torch.randint(0, data_size, (batch,), generator=gen)
    train_x, train_noise = chain_draws(gen, T, batch, train_samples, act_dim)
    rows = (1 + num_uniform) * batch
    # the script draws u ~ U[0, 1) and maps it to 2u - 1; the official fills U[-1, 1) directly: hand it 2u - 1
    uniform = 2.0 * torch.rand(num_uniform * batch, act_dim, generator=gen) - 1.0
    return UpdateDraws(critic_idx, target_x, target_noise, actor_idx, train_x, train_noise, uniform,
                       torch.randint(0, T, (rows,), generator=gen), torch.randn(rows, act_dim, generator=gen))


class DrawQueue:
    """Expected RNG calls of one side, in order: (kind, shape, value). The patched RNG functions pop them; a call of
    another kind or shape, or a draw left over at the end, raises: the comparison only counts if both sides consumed
    exactly the draws generated here."""

    def __init__(self, side: str):
        self.side, self.items = side, []

    def push(self, kind: str, value, high: int | None = None) -> None:
        self.items.append((kind, tuple(value.shape), value, high))

    def pop(self, kind: str, shape, high: int | None = None):
        shape = tuple(int(s) for s in shape)
        if not self.items:
            raise AssertionError(f"{self.side}: unexpected extra RNG call {kind}{shape}")
        want_kind, want_shape, value, want_high = self.items.pop(0)
        if (want_kind, want_shape) != (kind, shape) or (want_high is not None and high != want_high):
            raise AssertionError(f"{self.side}: RNG call {kind}{shape} (high={high}) where {want_kind}{want_shape} "
                                 f"(high={want_high}) was expected")
        return value

    def check_empty(self) -> None:
        if self.items:
            raise AssertionError(f"{self.side}: {len(self.items)} expected RNG calls were not made, next: "
                                 f"{self.items[0][0]}{self.items[0][1]}")


def _shape(args) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)


@contextlib.contextmanager
def injected(queue: DrawQueue):
    """Replace the RNG calls either side makes in an update (torch.randn/randn_like/rand/randint, Tensor.uniform_,
    np.random.randint) by pops from `queue`."""
    saved = (torch.randn, torch.randn_like, torch.rand, torch.randint, torch.Tensor.uniform_, np.random.randint)

    def randn(*args, **kwargs):
        return queue.pop("randn", _shape(args)).clone().to(kwargs.get("device") or "cpu")

    def randn_like(x, **kwargs):
        return queue.pop("randn", x.shape).clone().to(x.device, x.dtype)

    def rand(*args, **kwargs):
        return queue.pop("rand", _shape(args)).clone().to(kwargs.get("device") or "cpu")

    def randint(low, high, size, **kwargs):
        return queue.pop("randint", size, high).clone().to(kwargs.get("device") or "cpu")

    def uniform_(self, a=0.0, b=1.0):
        with torch.no_grad():
            return self.copy_(queue.pop("uniform", self.shape))

    def np_randint(low, high=None, size=None, dtype=int):
        return queue.pop("np_randint", (size,), high).numpy()

    torch.randn, torch.randn_like, torch.rand, torch.randint = randn, randn_like, rand, randint
    torch.Tensor.uniform_, np.random.randint = uniform_, np_randint
    try:
        yield queue
        queue.check_empty()
    finally:
        torch.randn, torch.randn_like, torch.rand, torch.randint, torch.Tensor.uniform_, np.random.randint = saved


@contextlib.contextmanager
def recording_clip(record: dict, names: dict):
    """Wrap nn.utils.clip_grad_norm_ (both sides call it through torch.nn.utils) to keep each gradient before and
    after the clip, under the common parameter names `names` (id(param) -> name)."""
    original = torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        for p in parameters:
            record[f"grad before clip.{names[id(p)]}"] = p.grad.detach().clone()
        norm = original(parameters, max_norm, *args, **kwargs)
        for p in parameters:
            record[f"grad after clip.{names[id(p)]}"] = p.grad.detach().clone()
        return norm

    torch.nn.utils.clip_grad_norm_ = clip
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = original


# ----------------------------------------------------------------------------------------------------------------------
# Common parameter names: "actor.time_mlp.0.weight", "actor.net.0.weight", "qf1.net.0.weight", ... (the script's)
# ----------------------------------------------------------------------------------------------------------------------

def script_names(actor, qf1, qf2, prefix: str = "") -> dict[str, torch.nn.Parameter]:
    named = {}
    for net_name, net in (("actor", actor), ("qf1", qf1), ("qf2", qf2)):
        for name, p in net.named_parameters():
            named[f"{prefix}{net_name}.{name}"] = p
    return named


def official_names(actor, critic, prefix: str = "") -> dict[str, torch.nn.Parameter]:
    """official Diffusion.model.time_mlp.{1,3} -> time_mlp.{0,2}; model.layer.i -> net.i; critic.q{h}_model.i ->
    qf{h}.net.i (the official time_mlp starts with the parameter-free SinusoidalPosEmb)."""
    named = {}
    for name, p in actor.named_parameters():
        parts = name.split(".")  # model.time_mlp.1.weight / model.layer.0.weight
        if parts[1] == "time_mlp":
            named[f"{prefix}actor.time_mlp.{int(parts[2]) - 1}.{parts[3]}"] = p
        else:
            named[f"{prefix}actor.net.{parts[2]}.{parts[3]}"] = p
    for name, p in critic.named_parameters():
        head, idx, kind = name.split(".")  # q1_model.0.weight
        named[f"{prefix}qf{head[1]}.net.{idx}.{kind}"] = p
    return named


def adam_state(optimizer: torch.optim.Optimizer, names: dict) -> dict:
    """Adam moments and step per common parameter name."""
    by_id = {id(p): n for n, p in names.items()}
    state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                state[f"{by_id[id(p)]}.{key}"] = value.detach().clone()
    return state


def load_adam_state(optimizer: torch.optim.Optimizer, names: dict, state: dict) -> None:
    by_id = {id(p): n for n, p in names.items()}
    optimizer.state.clear()
    for group in optimizer.param_groups:
        for p in group["params"]:
            keys = [k for k in state if k.rsplit(".", 1)[0] == by_id[id(p)]]
            if keys:
                optimizer.state[p] = {k.rsplit(".", 1)[1]: state[k].clone() for k in keys}


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic replay data, identical for both sides
# ----------------------------------------------------------------------------------------------------------------------

def make_data(seed: int, size: int = DATA_SIZE, obs_dim: int = OBS_DIM, act_dim: int = ACT_DIM) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    flags = rng.random(size)
    return {"obs": rng.normal(size=(size, obs_dim)).astype(np.float32),
            "next_obs": rng.normal(size=(size, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(size, act_dim)).astype(np.float32),
            "rewards": (rng.normal(size=size) + 1.0).astype(np.float32),
            "terminated": flags < TERMINATED_P,
            "truncated": (flags >= TERMINATED_P) & (flags < TERMINATED_P + TRUNCATED_P)}


# ----------------------------------------------------------------------------------------------------------------------
# The script's side
# ----------------------------------------------------------------------------------------------------------------------

class ScriptSide:
    """qvpo.py's networks, optimizers, replay buffer and `update`, driven with injected draws."""

    def __init__(self, qvpo, data: dict, truncation_fix: bool = False, seed: int = 0, overrides: dict | None = None,
                 name: str = "qvpo.py"):
        self.qvpo, self.name = qvpo, name
        torch.manual_seed(seed)
        self.args = args = qvpo.Args(**(overrides or {}))
        S, A, H, E, T = OBS_DIM, ACT_DIM, args.hidden_dim, args.time_dim, args.diffusion_steps
        cpu = torch.device("cpu")
        self.actor, self.actor_target = qvpo.Denoiser(S, A, H, E, T), qvpo.Denoiser(S, A, H, E, T)
        self.qf1, self.qf2 = qvpo.QNetwork(S, A, H), qvpo.QNetwork(S, A, H)
        self.qf1_target, self.qf2_target = qvpo.QNetwork(S, A, H), qvpo.QNetwork(S, A, H)
        self.q_optimizer = torch.optim.Adam([*self.qf1.parameters(), *self.qf2.parameters()], lr=args.q_lr,
                                            eps=args.adam_eps)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.policy_lr, eps=args.adam_eps)
        self.q_stats = torch.tensor([0.0, 1.0])
        self.schedule = qvpo.DDPMSchedule(qvpo.cosine_beta_schedule(T), cpu)
        self.rb = qvpo.ReplayBuffer(len(data["obs"]), S, A, cpu)
        # the script stores terminated only (truncations bootstrap); the official stores done = terminated or truncated
        dones = data["terminated"] | (False if truncation_fix else data["truncated"])
        self.rb.add(data["obs"], data["next_obs"], data["actions"], data["rewards"], dones.astype(np.float32))
        self.online = script_names(self.actor, self.qf1, self.qf2)
        self.target = script_names(self.actor_target, self.qf1_target, self.qf2_target, "target.")
        self.load_state(self.state())  # targets = online, as the script's main loop starts

    def omega(self, step: int) -> float:
        """omega of the update made at env step `step` (1-based count): the script evaluates it at the step before."""
        a = self.args
        return self.qvpo.entropy_weight(step - 1, a.total_timesteps, a.entropy_alpha, a.entropy_alpha_min)

    def hyper_parameters(self) -> dict:
        a = self.args
        return {"batch size": a.batch_size, "gamma": a.gamma, "tau": a.tau, "critic lr": a.q_lr, "actor lr": a.policy_lr,
                "Adam eps (critic)": self.q_optimizer.defaults["eps"],
                "Adam eps (actor)": self.actor_optimizer.defaults["eps"], "grad-norm clip": a.max_grad_norm,
                "diffusion steps": a.diffusion_steps, "train samples": a.train_samples,
                "behaviour samples": a.behavior_samples, "target samples": a.target_samples,
                "eval samples": a.eval_samples, "q transform": a.q_transform, "omega start": a.entropy_alpha,
                "omega floor": a.entropy_alpha_min, "omega decay steps": a.total_timesteps,
                "uniform rows per state": a.num_uniform, "running-Q rate": 0.001, "warm-up steps": a.learning_starts,
                "hidden width": a.hidden_dim, "time embedding": a.time_dim}

    def state(self) -> dict:
        return {"params": {n: p.detach().clone() for n, p in {**self.online, **self.target}.items()},
                "q_adam": adam_state(self.q_optimizer, self.online), "actor_adam": adam_state(self.actor_optimizer, self.online),
                "q_stats": self.q_stats.clone()}

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            for n, p in {**self.online, **self.target}.items():
                p.copy_(state["params"][n] if n in state["params"] else state["params"][n.replace("target.", "")])
        load_adam_state(self.q_optimizer, self.online, state["q_adam"])
        load_adam_state(self.actor_optimizer, self.online, state["actor_adam"])
        self.q_stats.copy_(state["q_stats"])

    def use_coefficients(self, diffusion) -> None:
        """Replace the script's coefficient table (float64 arithmetic, rounded to float32) by the official one
        (float32 arithmetic, agent/diffusion.py), to show which differences that table alone causes."""
        s = self.schedule
        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2"):
            setattr(s, name, getattr(diffusion, name).clone())
        s.posterior_std = (0.5 * diffusion.posterior_log_variance_clipped).exp()  # as the official p_sample
        s.steps = list(zip(*(getattr(s, k).tolist() for k in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                                                               "posterior_mean_coef1", "posterior_mean_coef2",
                                                               "posterior_std"))))

    def chain_queue(self, queue: DrawQueue, x: torch.Tensor, noise: torch.Tensor) -> None:
        """sample_actions draws x_T [B*K, A] then all the noise [T, B*K, A]; candidates of a state are contiguous."""
        queue.push("randn", x.reshape(-1, x.shape[-1]))
        queue.push("randn", noise.reshape(noise.shape[0], -1, noise.shape[-1]))

    def update(self, draws: UpdateDraws, step: int) -> dict:
        q = DrawQueue(self.name)
        q.push("randint", draws.critic_idx, self.rb.size)
        self.chain_queue(q, draws.target_x, draws.target_noise)
        q.push("randint", draws.actor_idx, self.rb.size)
        self.chain_queue(q, draws.train_x, draws.train_noise)
        q.push("rand", (draws.uniform + 1.0) / 2.0)
        q.push("randint", draws.loss_t, self.schedule.T)
        q.push("randn", draws.loss_eps)
        record, omega = {}, self.omega(step)
        with injected(q), recording_clip(record, {id(p): n for n, p in self.online.items()}):
            out = self.qvpo.update(self.args, self.actor, self.actor_target, self.qf1, self.qf2, self.qf1_target,
                                   self.qf2_target, self.q_optimizer, self.actor_optimizer, self.q_stats, self.schedule,
                                   self.rb, omega)
        record.update({
            "omega": torch.tensor(omega), "target candidates min Q'": out["next_q"],
            "TD target min Q'(s', a')": out["next_q"].max(1).values, "TD target": out["td_target"],
            "Q1(s, a)": out["qf1_values"], "Q2(s, a)": out["qf2_values"], "critic loss Q1": out["qf1_loss"],
            "critic loss Q2": out["qf2_loss"], "critic loss": out["qf1_loss"] + out["qf2_loss"],
            "actor candidates min Q": out["q"], "actor kept action": out["best_actions"],
            "actor kept min Q": out["q"].max(1).values, "V(s) = mean min Q": out["q"].mean(1),
            "running Q mean": self.q_stats[0], "running Q std": self.q_stats[1], "weight w(s)": out["weights"],
            "loss rows: states": out["rows_obs"], "loss rows: actions": out["rows_actions"],
            "loss rows: weights": out["rows_weights"], "loss rows: x_t": out["x_t"], "loss rows: eps_pred": out["eps_pred"],
            "actor loss": out["actor_loss"], "critic lr": torch.tensor(self.q_optimizer.param_groups[0]["lr"]),
            "actor lr": torch.tensor(self.actor_optimizer.param_groups[0]["lr"])})
        for n, p in {**self.online, **self.target}.items():
            record[f"param after step.{n}"] = p.detach().clone()
        return record

    def choose(self, obs: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, evaluation: bool) -> torch.Tensor:
        """The action played for each state: best of eval_samples (evaluation) or behavior_samples by the online
        critics, from given candidates' draws x [B, K, A], noise [T, B, K, A] (the main loop's `act`)."""
        q = DrawQueue(self.name)
        self.chain_queue(q, x, noise)
        with injected(q):
            return self.qvpo.sample_actions(self.actor, self.qf1, self.qf2, self.schedule, obs, x.shape[1])[0]


# ----------------------------------------------------------------------------------------------------------------------
# The official side
# ----------------------------------------------------------------------------------------------------------------------

def import_official(path: str):
    """Import the official agent and main.py's argument parser. main.py imports gym and tensorboardX at the top but
    uses them only inside main(); small stand-ins (not the packages) let it import without them."""
    sys.path.insert(0, path)
    for name, attrs in (("gym", {}), ("tensorboardX", {"SummaryWriter": object})):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
    import agent.qvpo as official_agent  # noqa: E402 (the official package)
    import agent.replay_memory as official_memory
    import agent.model as official_model
    spec = importlib.util.spec_from_file_location("official_main", os.path.join(path, "main.py"))
    official_main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official_main)
    return types.SimpleNamespace(agent=official_agent, memory=official_memory, model=official_model, main=official_main)


def official_defaults(official) -> argparse.Namespace:
    """main.py's parser with the README's flags (--weighted --aug) and nothing else: the official default row."""
    argv, sys.argv = sys.argv, ["main.py", "--weighted", "--aug"]
    try:
        return official.main.readParser()
    finally:
        sys.argv = argv


class OfficialSide:
    """The official QVPO agent (agent/qvpo.py) and ReplayMemory, driven with injected draws; its intermediate values are
    recorded by wrapping the functions that compute them (F.mse_loss, sample_n, the q-transform, q_sample, loss)."""

    name = "official"

    def __init__(self, official, data: dict, seed: int = 0):
        self.official = official
        torch.manual_seed(seed)
        self.args = args = official_defaults(official)
        action_space = types.SimpleNamespace(shape=(ACT_DIM,), high=np.ones(ACT_DIM, np.float32),
                                             low=-np.ones(ACT_DIM, np.float32))
        self.memory = official.memory.ReplayMemory(OBS_DIM, ACT_DIM, len(data["obs"]), torch.device("cpu"))
        self.agent = official.agent.QVPO(args, OBS_DIM, action_space, self.memory, None, torch.device("cpu"))
        for i in range(len(data["obs"])):  # main.py L183, L189: mask = 0 if done (terminated or truncated) else gamma
            done = data["terminated"][i] or data["truncated"][i]
            self.agent.append_memory(data["obs"][i], data["actions"][i], data["rewards"][i], data["next_obs"][i],
                                     0.0 if done else args.gamma)
        ag = self.agent
        self.online = official_names(ag.actor, ag.critic)
        self.target = official_names(ag.actor_target, ag.critic_target, "target.")

    def omega(self, step: int) -> float:
        """main.py L193 sets agent.entropy_alpha after each train(steps): the update at `step` uses the value set at
        step - 1 (restated here: it is inline in main(), not a function)."""
        a = self.args
        return min(a.entropy_alpha, max(0.002, a.entropy_alpha - (step - 1) / a.num_steps * a.entropy_alpha))

    def hyper_parameters(self) -> dict:
        a, ag = self.args, self.agent
        return {"batch size": a.batch_size, "gamma": a.gamma, "tau": a.tau, "critic lr": a.critic_lr,
                "actor lr": a.diffusion_lr, "Adam eps (critic)": ag.critic_optimizer.defaults["eps"],
                "Adam eps (actor)": ag.actor_optimizer.defaults["eps"], "grad-norm clip": a.ac_grad_norm,
                "diffusion steps": a.n_timesteps, "train samples": a.train_sample, "behaviour samples": a.behavior_sample,
                "target samples": a.target_sample, "eval samples": a.eval_sample, "q transform": a.q_transform,
                "omega start": a.entropy_alpha, "omega floor": 0.002, "omega decay steps": a.num_steps,
                "uniform rows per state": NUM_UNIFORM, "running-Q rate": a.alpha_mean, "warm-up steps": 10_000,
                "hidden width": ag.critic.q1_model[0].out_features, "time embedding": ag.actor.model.time_mlp[0].dim}

    def state(self) -> dict:
        ag = self.agent
        return {"params": {n: p.detach().clone() for n, p in {**self.online, **self.target}.items()},
                "q_adam": adam_state(ag.critic_optimizer, self.online),
                "actor_adam": adam_state(ag.actor_optimizer, self.online),
                "q_stats": torch.tensor([float(ag.running_q_mean), float(ag.running_q_std)])}

    def chain_queue(self, queue: DrawQueue, x: torch.Tensor, noise: torch.Tensor) -> None:
        """p_sample_loop draws x_T [K*B, A] (state.repeat(K, 1): candidate k of state b is row k B + b), then one
        randn_like per step t = T-1 .. 0 (t = 0's is multiplied by a zero mask)."""
        K = x.shape[1]
        queue.push("randn", x.transpose(0, 1).reshape(-1, x.shape[-1]))
        for t in reversed(range(noise.shape[0])):
            queue.push("randn", noise[t].transpose(0, 1).reshape(K * x.shape[0], -1))

    @contextlib.contextmanager
    def recorders(self, rec: dict):
        """Wrap the official functions whose results are compared, restoring them afterwards."""
        ag, off = self.agent, self.official
        F = torch.nn.functional
        saved_mse, saved_qadv = F.mse_loss, off.agent.qadv
        calls = rec.setdefault("_calls", {"mse": [], "critic": [], "critic_target": []})

        def mse_loss(pred, target, *args, **kwargs):
            out = saved_mse(pred, target, *args, **kwargs)
            calls["mse"].append((pred.detach().clone(), target.detach().clone(), out.detach().clone()))
            return out

        def recording_forward(name, module):
            def forward(state, action):
                q1, q2 = type(module).forward(module, state, action)
                calls[name].append((q1.detach().clone(), q2.detach().clone()))
                return q1, q2
            return forward

        def sample_n(*args, **kwargs):
            out = type(ag.actor).sample_n(ag.actor, *args, **kwargs)
            rec["_sample_n"] = out
            return out

        def qadv(q, **kwargs):
            out = saved_qadv(q, **kwargs)
            rec["_weights"] = out.clone()
            return out

        def loss(x, state, weights=1.0):
            rec["_loss_inputs"] = (x.detach().clone(), state.detach().clone(), weights.detach().clone())
            out = type(ag.actor).loss(ag.actor, x, state, weights)
            rec["_actor_loss"] = out.detach().clone()
            return out

        def q_sample(x_start, t, noise=None):
            out = type(ag.actor).q_sample(ag.actor, x_start, t, noise)
            rec["_x_t"] = out.clone()
            return out

        F.mse_loss, off.agent.qadv = mse_loss, qadv
        ag.critic.forward = recording_forward("critic", ag.critic)
        ag.critic_target.forward = recording_forward("critic_target", ag.critic_target)
        ag.actor.sample_n, ag.actor.loss, ag.actor.q_sample = sample_n, loss, q_sample
        try:
            yield
        finally:
            F.mse_loss, off.agent.qadv = saved_mse, saved_qadv
            for name, module in (("forward", ag.critic), ("forward", ag.critic_target), ("sample_n", ag.actor), ("loss", ag.actor),
                                 ("q_sample", ag.actor)):
                del module.__dict__[name]

    def update(self, draws: UpdateDraws, step: int) -> dict:
        ag, B = self.agent, len(draws.critic_idx)
        q, size = DrawQueue(self.name), self.memory.capacity if self.memory.full else self.memory.idx
        q.push("np_randint", draws.critic_idx, size)
        self.chain_queue(q, draws.target_x, draws.target_noise)
        q.push("np_randint", draws.actor_idx, size)
        self.chain_queue(q, draws.train_x, draws.train_noise)
        q.push("uniform", draws.uniform)
        q.push("randint", draws.loss_t, ag.actor.n_timesteps)
        q.push("randn", draws.loss_eps)
        ag.entropy_alpha = omega = self.omega(step)
        rec = {}
        with injected(q), recording_clip(rec, {id(p): n for n, p in self.online.items()}), self.recorders(rec):
            ag.train(step, 1, batch_size=B)
        calls = rec.pop("_calls")
        (q1, td, l1), (q2, _, l2), (eps_pred, eps, _) = calls["mse"]
        cand1, cand2 = calls["critic_target"][0]  # the target actor's candidates: [K_t B, 1], row k B + b
        kept1, kept2 = calls["critic_target"][1]  # critic_target(next_states, next_actions): [B, 1]
        states, best_actions, (q_kept, v), _ = rec.pop("_sample_n")
        loss_actions, loss_states, loss_weights = rec.pop("_loss_inputs")
        K_t = cand1.shape[0] // B
        rec.update({
            "omega": torch.tensor(omega),
            "target candidates min Q'": torch.min(cand1, cand2).view(K_t, B).t(),
            "TD target min Q'(s', a')": torch.min(kept1, kept2), "TD target": td, "Q1(s, a)": q1, "Q2(s, a)": q2,
            "critic loss Q1": l1, "critic loss Q2": l2, "critic loss": l1 + l2,
            "actor kept action": best_actions, "actor kept min Q": q_kept, "V(s) = mean min Q": v,
            "running Q mean": torch.as_tensor(ag.running_q_mean), "running Q std": torch.as_tensor(ag.running_q_std),
            "weight w(s)": rec.pop("_weights"), "loss rows: states": loss_states, "loss rows: actions": loss_actions,
            "loss rows: weights": loss_weights, "loss rows: x_t": rec.pop("_x_t"), "loss rows: eps_pred": eps_pred,
            "actor loss": rec.pop("_actor_loss"), "critic lr": torch.tensor(ag.critic_optimizer.param_groups[0]["lr"]),
            "actor lr": torch.tensor(ag.actor_optimizer.param_groups[0]["lr"])})
        c1, c2 = calls["critic"][1]  # the critic inside sample_n on the N_d candidates: [N_d B, 1], row k B + b
        rec["actor candidates min Q"] = torch.min(c1, c2).view(-1, B).t()
        for n, p in {**self.online, **self.target}.items():
            rec[f"param after step.{n}"] = p.detach().clone()
        return rec

    def choose(self, obs: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, evaluation: bool) -> torch.Tensor:
        """sample_action(state, eval) for each state (it takes one state): best of eval_sample (eval=True) or
        behavior_sample (eval=False, after its epsilon-greedy torch.rand(1) draw) by the online critic."""
        ag, actions = self.agent, []
        for b in range(len(obs)):
            q = DrawQueue(self.name)
            if not evaluation:
                q.push("rand", torch.tensor([0.5]))  # epsilon = 0: any draw keeps the diffusion branch
            self.chain_queue(q, x[b:b + 1], noise[:, b:b + 1])
            with injected(q):
                actions.append(torch.as_tensor(ag.sample_action(obs[b].numpy(), eval=evaluation)))
        return torch.stack(actions)


# ----------------------------------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------------------------------

def sync(ours, official) -> None:
    """Start from identical state: the official initial weights (online and target), empty Adam states, q statistics."""
    ours.load_state(official.state())


def row_order(name: str) -> tuple:
    groups = ("grad before clip.", "grad after clip.", "param after step.target.", "param after step.")
    return next((i + 1 for i, g in enumerate(groups) if name.startswith(g)), 0), 0


def compare_hyper_parameters(ours, official) -> tuple[str, list[str]]:
    """Markdown table of the hyper-parameters both sides use, and the names of those that differ."""
    mine, theirs = ours.hyper_parameters(), official.hyper_parameters()
    lines, bad = ["| hyper-parameter | qvpo.py | official |", "|---|---:|---:|"], []
    for key in theirs:
        same = mine[key] == theirs[key] if isinstance(theirs[key], str) else math.isclose(mine[key], theirs[key])
        lines.append(f"| {key} | {mine[key]} | {theirs[key]}{'' if same else ' **differs**'} |")
        if not same:
            bad.append(key)
    return "\n".join(lines), bad


def compare_updates(ours, official, comparison: common.Comparison, updates: int, seed: int,
                    start_step: int = START_STEP, truncation: dict | None = None) -> None:
    """Run `updates` consecutive updates on both sides with the same draws and add every recorded quantity.

    truncation: {"truncated": bool [data rows], "gamma": float} switches to the --keep-truncation-fix analysis: per
    update the TD target is compared on the rows without a time-limit truncation and, on the truncated rows, against
    the official target plus gamma * min Q'(s', a'); then the script is re-synced to the official state."""
    a = ours.args
    gen = torch.Generator().manual_seed(seed)
    truncated_rows = 0
    for u in range(updates):
        draws = make_update_draws(gen, DATA_SIZE, a.batch_size, a.diffusion_steps, a.target_samples, a.train_samples,
                                  ACT_DIM, a.num_uniform)
        rec_o = official.update(draws, start_step + u)
        rec_s = ours.update(draws, start_step + u)
        if set(rec_o) != set(rec_s):
            raise ValueError(f"recorded quantities differ: {sorted(set(rec_o) ^ set(rec_s))}")
        if truncation is None:
            for name in sorted(rec_o, key=row_order):
                comparison.add(name, rec_s[name], rec_o[name])
            continue
        cut = torch.as_tensor(truncation["truncated"])[draws.critic_idx]
        td_o, td_s = rec_o["TD target"].view(-1), rec_s["TD target"].view(-1)
        kept_q = rec_o["TD target min Q'(s', a')"].view(-1)
        comparison.add("TD target, rows without a truncation", td_s[~cut], td_o[~cut])
        truncated_rows += int(cut.sum())
        comparison.add("TD target, truncated rows", td_s[cut], td_o[cut],
                       note=f"the fix, expected to differ; {truncated_rows} rows")
        comparison.add("TD target, truncated rows, vs official + gamma min Q'(s', a')", td_s[cut],
                       td_o[cut] + truncation["gamma"] * kept_q[cut])
        ours.load_state(official.state())  # the next update starts from identical state again


def compare_choices(ours, official, comparison: common.Comparison, seed: int, states: torch.Tensor) -> None:
    """The action each side plays for the same states from the same candidates' draws: evaluation (best of
    eval_samples, online actor and critics) and behaviour (best of behavior_samples)."""
    a = ours.args
    gen = torch.Generator().manual_seed(seed + 1)
    for label, evaluation, k in (("evaluation action (best of eval_samples)", True, a.eval_samples),
                                 ("behaviour action (best of behavior_samples)", False, a.behavior_samples)):
        x, noise = chain_draws(gen, a.diffusion_steps, len(states), k, ACT_DIM)
        comparison.add(label, ours.choose(states, x, noise, evaluation), official.choose(states, x, noise, evaluation))


def compare_omega_schedule(ours, official, comparison: common.Comparison) -> None:
    """omega at every 1000th env step of a default run (the official lr schedule is constant; omega is the one
    schedule), each side's rule at the same step."""
    steps = range(10_001, 1_000_001, 1000)
    comparison.add("omega schedule (steps 10k..1M)", torch.tensor([ours.omega(s) for s in steps], dtype=torch.float64),
                   torch.tensor([official.omega(s) for s in steps], dtype=torch.float64))


def script_init(qvpo, overrides: dict | None = None):
    """A function drawing fresh script networks: {common name: parameter}."""
    args = qvpo.Args(**(overrides or {}))

    def draw() -> dict:
        actor = qvpo.Denoiser(OBS_DIM, ACT_DIM, args.hidden_dim, args.time_dim, args.diffusion_steps)
        qf1, qf2 = qvpo.QNetwork(OBS_DIM, ACT_DIM, args.hidden_dim), qvpo.QNetwork(OBS_DIM, ACT_DIM, args.hidden_dim)
        return script_names(actor, qf1, qf2)

    return draw


def official_init(official):
    """A function drawing fresh official networks (agent/model.py's Model and Critic, each applying init_weights)."""

    def draw() -> dict:
        model, critic = official.model.Model(OBS_DIM, ACT_DIM), official.model.Critic(OBS_DIM, ACT_DIM)
        actor = types.SimpleNamespace(named_parameters=lambda: ((f"model.{n}", p) for n, p in model.named_parameters()))
        return official_names(actor, critic)

    return draw


def init_distribution(draw_ours, draw_official, draws: int) -> tuple[str, list[str]]:
    """Per layer: weight mean, std and the share beyond 2 nominal std (1 / (2 sqrt(fan_in)), the official
    init_weights), pooled over `draws` fresh networks from each side's initializer (the official truncation loop
    rebinds a local, so its weights are untruncated normal: ~4.6% beyond 2 std), plus the largest |bias|. A layer
    passes when the two sides' mean, std and share agree within 5 standard errors and both biases are 0."""
    pooled: dict[str, dict[str, list]] = {}
    for _ in range(draws):
        for side, params in (("ours", draw_ours()), ("official", draw_official())):
            for name, p in params.items():
                pooled.setdefault(name, {"ours": [], "official": []})[side].append(p.detach().reshape(-1).double())
    lines = ["| layer | fan-in | nominal std | official mean / std / beyond 2 std | qvpo.py mean / std / beyond 2 std "
             "| max \\|bias\\| (both) | agree |", "|---|---:|---:|---:|---:|---:|:-:|"]
    bad = []
    for name, entry in pooled.items():
        if name.endswith(".bias"):
            continue
        o, s = torch.cat(entry["official"]), torch.cat(entry["ours"])
        bias = pooled[name.replace(".weight", ".bias")]
        max_bias = max(float(torch.cat(bias["official"]).abs().max()), float(torch.cat(bias["ours"]).abs().max()))
        fan_in = len(o) // len(torch.cat(bias["official"]))  # weights [out, in] over biases [out], same draws
        nominal = 1.0 / (2.0 * math.sqrt(fan_in))
        stats = {}
        for side, w in (("official", o), ("ours", s)):
            stats[side] = (float(w.mean()), float(w.std()), float((w.abs() > 2 * nominal).double().mean()), len(w))
        (mo, so, po, no), (ms, ss, ps, ns) = stats["official"], stats["ours"]
        ok = (abs(ms - mo) <= 5 * nominal * math.sqrt(1 / no + 1 / ns)
              and abs(ss - so) <= 5 * nominal * math.sqrt(1 / (2 * no) + 1 / (2 * ns))
              and abs(ps - po) <= 5 * math.sqrt(max(po, 1e-6) * (1 - po) * (1 / no + 1 / ns)) and max_bias == 0.0)
        if not ok:
            bad.append(name)
        lines.append(f"| {name} | {fan_in} | {nominal:.5f} | {mo:+.1e} / {so:.5f} / {po:.2%} | {ms:+.1e} / {ss:.5f} / "
                     f"{ps:.2%} | {max_bias:g} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines), bad


# ----------------------------------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------------------------------

def plain_update(side: ScriptSide, step: int = START_STEP) -> None:
    """The script's update as its main loop calls it (the RNG not patched)."""
    side.qvpo.update(side.args, side.actor, side.actor_target, side.qf1, side.qf2, side.qf1_target, side.qf2_target,
                     side.q_optimizer, side.actor_optimizer, side.q_stats, side.schedule, side.rb, side.omega(step))


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


SELF_TEST_ARGS = {"batch_size": 32, "train_samples": 8, "target_samples": 2, "behavior_samples": 2, "eval_samples": 4,
                  "hidden_dim": 32, "diffusion_steps": 5}  # small shapes for --self-test (CI)
PERTURBATIONS = ("gamma", "tau", "q_weights", "init")


def perturbed_reference(qvpo_path: str, data: dict, cli) -> tuple[ScriptSide, callable]:
    """--self-test: a second, separately imported copy of qvpo.py stands in for the official side, with at most one
    planted difference (--perturb), which the comparison must report."""
    ref = load_module(qvpo_path, "reference_qvpo")
    side = ScriptSide(ref, data, seed=cli.seed, overrides=SELF_TEST_ARGS, name="reference")
    if cli.perturb == "gamma":  # discount 0.98: the hyper-parameter table, the TD target and everything after it
        side.args.gamma = 0.98
    elif cli.perturb == "tau":  # EMA rate 0.0051: only the target networks
        side.args.tau = 0.0051
    elif cli.perturb == "q_weights":  # the sample weights w(s) x (1 + 1e-4)
        q_weights = ref.q_weights
        ref.q_weights = lambda *a, **k: q_weights(*a, **k) * (1 + 1e-4)
    draw = script_init(ref, SELF_TEST_ARGS)
    if cli.perturb == "init":  # every weight std x 1.25 (the small self-test layers resolve ~10%; full size ~0.3%)
        plain = draw
        draw = lambda: {n: p * 1.25 for n, p in plain().items()}  # noqa: E731
    return side, draw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", help=f"checkout of {URL} at {COMMIT}")
    parser.add_argument("--updates", type=int, default=5, help="consecutive updates compared")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the draws and the initial weights")
    parser.add_argument("--init-draws", type=int, default=20, help="fresh networks per side for the init statistics")
    parser.add_argument("--keep-truncation-fix", action="store_true",
                        help="store terminated-only flags in the script's buffer (what qvpo.py does) and show the "
                             "TD-target difference this makes")
    parser.add_argument("--official-coefficients", action="store_true",
                        help="give the script the official float32 diffusion coefficients instead of its own "
                             "(computed in float64, then rounded to float32)")
    parser.add_argument("--speed", action="store_true", help="time updates instead of comparing them")
    parser.add_argument("--rounds", type=int, default=5, help="--speed: interleaved rounds")
    parser.add_argument("--calls", type=int, default=2, help="--speed: updates per side per round")
    parser.add_argument("--baseline-script", default=None,
                        help="--speed: also time this copy of qvpo.py (e.g. `git show REV:qvpo.py > old.py`)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of one update of each side")
    parser.add_argument("--self-test", action="store_true",
                        help="no official code: compare qvpo.py with a second copy of itself (small shapes), to test "
                             "the harness; with --perturb, one planted difference must be reported")
    parser.add_argument("--perturb", choices=PERTURBATIONS, default=None, help="--self-test: the planted difference")
    cli = parser.parse_args(argv)
    qvpo = common.load_script("qvpo")
    data = make_data(cli.seed)

    if cli.self_test:
        official_side, draw_official = perturbed_reference(os.path.join(common.REPO_ROOT, "qvpo.py"), data, cli)
        ours = ScriptSide(qvpo, data, truncation_fix=cli.keep_truncation_fix, seed=cli.seed + 1,
                          overrides=SELF_TEST_ARGS)
        draw_ours = script_init(qvpo, SELF_TEST_ARGS)
        title = f"qvpo.py vs a copy of itself{f' with --perturb {cli.perturb}' if cli.perturb else ''}"
    else:
        path = common.require_official(cli.official, URL, COMMIT)
        official = import_official(path)
        if cli.speed or cli.profile:
            return speed(official, qvpo, data, cli)
        official_side = OfficialSide(official, data, cli.seed)
        ours = ScriptSide(qvpo, data, truncation_fix=cli.keep_truncation_fix, seed=cli.seed)
        if cli.official_coefficients:
            ours.use_coefficients(official_side.agent.actor)
        draw_ours, draw_official = script_init(qvpo), official_init(official)
        title = f"qvpo.py vs official QVPO ({COMMIT})" + (", official float32 coefficients in the script"
                                                          if cli.official_coefficients else "")
    sync(ours, official_side)
    hyper_table, hyper_bad = compare_hyper_parameters(ours, official_side)
    print(f"## Hyper-parameters\n\n{hyper_table}\n")
    comparison = common.Comparison()
    if cli.keep_truncation_fix:
        compare_updates(ours, official_side, comparison, cli.updates, cli.seed,
                        truncation={"truncated": data["truncated"], "gamma": ours.args.gamma})
        print(f"## {title}: qvpo.py's truncation fix vs terminal time limits, {cli.updates} updates\n\n"
              f"{common.environment()}\n\n{comparison.table()}\n")
        expected = ["TD target, truncated rows"]
        ok = comparison.failures() == expected
        print("OK: the TD target differs only on time-limit-truncated rows, by gamma * min Q'(s', a')" if ok else
              f"MISMATCH: failures {comparison.failures()} (expected exactly {expected})")
        return 0 if ok and not hyper_bad else 1
    compare_updates(ours, official_side, comparison, cli.updates, cli.seed)
    compare_choices(ours, official_side, comparison, cli.seed, torch.as_tensor(data["obs"][:8]))
    compare_omega_schedule(ours, official_side, comparison)
    code = comparison.report(f"{title}, {cli.updates} consecutive updates")
    init_table, init_bad = init_distribution(draw_ours, draw_official, cli.init_draws)
    print(f"\n## Initial weights, {cli.init_draws} fresh networks per side\n\n{init_table}\n")
    print(f"MISMATCH in the init of {init_bad}" if init_bad else "OK: every layer's init agrees")
    if hyper_bad:
        print(f"MISMATCH in hyper-parameters: {hyper_bad}")
    return 1 if code or init_bad or hyper_bad else 0


def speed(official, qvpo, data: dict, cli) -> int:
    """--speed: ms per update of each side, one thread, interleaved rounds; --profile: where one update's time goes."""
    torch.set_num_threads(1)
    off = OfficialSide(official, data, cli.seed)
    sides = {"qvpo.py": ScriptSide(qvpo, data, seed=cli.seed)}
    if cli.baseline_script:
        sides["qvpo.py (baseline)"] = ScriptSide(load_module(cli.baseline_script, "qvpo_baseline"), data, seed=cli.seed)
    for side in sides.values():
        sync(side, off)
    official_update = lambda: off.agent.train(START_STEP, 1, batch_size=off.args.batch_size)  # noqa: E731
    if cli.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("qvpo.py", lambda: plain_update(sides["qvpo.py"])), ("official", official_update)):
            fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"## {name}: one update\n\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12)}")
        return 0
    fns = {"official": official_update}
    fns.update({name: (lambda s=side: plain_update(s)) for name, side in sides.items()})
    results = common.time_interleaved(fns, rounds=cli.rounds, calls=cli.calls)
    print(f"## QVPO update speed, CPU, one thread\n\n{common.environment()}\n\n{common.speed_table(results, 'official')}")
    if cli.baseline_script:
        print(f"\nqvpo.py vs its baseline: {results['qvpo.py (baseline)'][0] / results['qvpo.py'][0]:.2f}x faster per "
              "update (medians of the same run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
