"""The official Diffusion-QL code trained on a Minari dataset and evaluated exactly as diffusion_ql.py evaluates, so
that its learning curve can be plotted beside the script's (`benchmarks/report.py` groups it as
`official_diffusion_ql`).

    python benchmarks/official_diffusion_ql.py --official PATH/TO/Diffusion-Policies-for-Offline-RL \
        --dataset-id regen/pointmaze/umaze-v2 --seed 1

The algorithm is the official `agents.ql_diffusion.Diffusion_QL` of Zhendong-Wang/Diffusion-Policies-for-Offline-RL
@ d871f5c, imported from `--official` (nothing of it is copied here). Everything that is not the algorithm is
diffusion_ql.py's own code, loaded from the repository root: the Minari data (the same transitions, actions rescaled
to [-1, 1], the same reward transform and goal terminals), the preset resolution, the evaluation (the same envs, eval
seeds seed+100+i, one episode each, the same normalised score), checkpoints and RNG handling. The official `main.py`
(gym, d4rl) is not imported; this file plays its part:

- Constructor arguments, as main.py passes them for the official row the script's preset resolves to (PointMaze:
  the locomotion preset = hopper-medium-v2: lr 3e-4, eta 1.0, no max-Q backup, no reward tune, gn 9.0, 2000
  epochs): discount, tau, max_q_backup, beta_schedule 'vp', n_timesteps T = 5, eta, lr, lr_decay, lr_maxt =
  num_epochs, grad_norm = gn, max_action 1.0 (the data are in [-1, 1]); ema_decay 0.995, step_start_ema 1000 and
  update_ema_every 5 are the constructor defaults main.py leaves alone (the script's values, passed explicitly).
  The critic lr (3e-4), the widths (256), the 10 max-Q backup samples and the 50 evaluation candidates drawn by
  softmax(min target Q) in `sample_action` are hard-coded in the official agent. main.py's `top_k` is not an
  action-selection setting: it picks a checkpoint by its rank in mean BC loss (`--ms offline`); each evaluation in
  summary.json carries the mean losses of its training period, from which that choice can be recomputed.
- Data: a small buffer with the official `Data_Sampler.sample(batch_size)` interface (uniform with replacement;
  state, action, next_state, reward [B, 1], not_done [B, 1]) over diffusion_ql.py's tensors.
- Schedule: main.py calls `agent.train(iterations = 50 epochs x 1000)` once per evaluation, and `train` steps the
  cosine lr schedulers (with --lr-decay) once at the end of each call. Here `train` is called in chunks of at most
  `--log-frequency` iterations (status lines, loss scalars, checkpoints between them); the official loop keeps no
  state per call besides that scheduler step, so the chunks are exactly one long call as long as the schedulers step
  only after the chunk that ends an evaluation period: the agent's `lr_decay` flag is switched off for the other
  chunks. The lr after k evaluations is therefore the official one, T_max = num_epochs of the row (diffusion_ql.py
  uses total_timesteps / 1000, the same number at the official budget; they differ only for shortened runs with
  --lr-decay). `train` gets no log_writer, as in main.py.
- Seeds: Python, numpy and torch seeded with --seed before the agent is built, as diffusion_ql.py.

Outputs as the scripts': runs/{dataset_id with / -> _}__official_diffusion_ql__{seed}__{time}/ with the TensorBoard
scalars eval/episodic_return, eval/episodic_return_std, eval/normalized_score, charts/SPS and losses/{bc,ql,actor,
critic}_loss (means over each chunk), summary.json with diffusion_ql.py's keys, and with --save-model checkpoint.pt
(the official actor, critic, target critic, EMA actor, optimizers and schedulers, step counters, evaluation history,
RNG states). `--resume runs/<run>/checkpoint.pt` continues it, so `benchmarks/benchmark.py` launches and resumes this
file like a script (pass `--official PATH` in --extra).
"""

import json
import os
import random
import sys
import time
import types
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity"))  # last: harnesses share names
from common import load_script, require_official  # noqa: E402  (benchmarks/parity/common.py)

URL = "https://github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL"
COMMIT = "d871f5c"
SCRIPT = os.path.basename(__file__)
AGENT_STATE = ("actor", "critic", "critic_target", "ema_model", "actor_optimizer", "critic_optimizer")
SCHEDULERS = ("actor_lr_scheduler", "critic_lr_scheduler")
FIXED_ON_RESUME = ("dataset_id", "preset", "lr_decay")  # the saved agent was built for these
LOSSES = ("bc_loss", "ql_loss", "actor_loss", "critic_loss")  # the official train() metrics


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (report.py groups runs by it)"""
    official: str | None = None
    """checkout of Zhendong-Wang/Diffusion-Policies-for-Offline-RL at d871f5c"""
    dataset_id: str = "mujoco/hopper/medium-v0"
    """Minari dataset id (Box observations and actions); looked up under MINARI_DATASETS_PATH first"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str | None = None
    """torch device of the agent and the data (None: cuda if available, else cpu)"""
    total_timesteps: int | None = None
    """number of gradient steps (None: the preset's epochs x 1000, e.g. 2M for locomotion)"""
    batch_size: int = 256
    """the batch size (official --batch_size)"""
    eval_frequency: int = 50_000
    """gradient steps between evaluations (official: every 50 epochs of 1000 steps, one train() call each)"""
    eval_episodes: int | None = None
    """episodes per evaluation (None: 10 for locomotion, 100 for antmaze, pen and kitchen, as diffusion_ql.py)"""
    log_frequency: int = 1_000
    """gradient steps per official train() call: a status line and the mean losses after each"""
    save_model: bool = False
    """write runs/{run_name}/checkpoint.pt every `checkpoint_frequency` gradient steps and at the end"""
    checkpoint_frequency: int = 50_000
    """gradient steps between checkpoints (with --save-model)"""
    resume: str | None = None
    """path of a checkpoint.pt to continue from (flags given with it override the saved ones)"""
    preset: str = "auto"
    """official row: auto (from the dataset id, as diffusion_ql.py), locomotion, antmaze, pen, kitchen, or an
    official task name such as hopper-medium-v2"""
    lr_decay: bool = False
    """the official --lr_decay: cosine over T_max = num_epochs, stepped once per evaluation period"""


def fail(message: str) -> None:
    sys.exit(f"{SCRIPT}: error: {' '.join(message.split())}")


class ReplayBuffer:
    """The official Data_Sampler's interface over diffusion_ql.py's tensors (already on the device, rewards already
    transformed): sample(batch_size) -> state [B, S], action [B, A], next_state [B, S], reward [B, 1], not_done [B, 1]."""

    def __init__(self, data: dict[str, torch.Tensor]):
        self.state, self.action, self.next_state = data["obs"], data["actions"], data["next_obs"]
        self.reward, self.not_done = data["rewards"][:, None], data["not_dones"][:, None]

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        ind = torch.randint(0, self.state.shape[0], (batch_size,), device=self.state.device)  # with replacement
        return self.state[ind], self.action[ind], self.next_state[ind], self.reward[ind], self.not_done[ind]


def import_official(path: str) -> type:
    """The official Diffusion_QL class from the checkout at `path` (appended to sys.path: nothing here is shadowed)."""
    sys.path.append(path)
    try:
        import dateutil.tz  # noqa: F401  (the official utils/logger.py needs python-dateutil)
    except ImportError:  # agents/ql_diffusion.py imports utils.logger.logger but Diffusion_QL never calls it
        stand_in = types.ModuleType("utils.logger")
        stand_in.logger = None
        sys.modules["utils.logger"] = stand_in
    try:
        from agents.ql_diffusion import Diffusion_QL
    except ImportError as e:
        fail(f"cannot import agents.ql_diffusion from {path} ({type(e).__name__}: {e}); is it a checkout of {URL}?")
    where = os.path.abspath(sys.modules["agents.ql_diffusion"].__file__)
    if not where.startswith(os.path.join(path, "")):
        fail(f"agents.ql_diffusion was imported from {where}, not from {path}: another 'agents' package shadows it")
    return Diffusion_QL


def load_checkpoint(path: str) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated file, not a pickle, ...
        fail(f"--resume: cannot read {path!r} as a checkpoint ({type(e).__name__}: {e})")
    if not (isinstance(checkpoint, dict) and "global_step" in checkpoint and "actor" in checkpoint
            and set(checkpoint.get("args", {"?": 0})) <= set(Args.__dataclass_fields__)):
        fail(f"--resume: {path!r} is not a checkpoint written by {SCRIPT} --save-model")
    return checkpoint


def resolve_device(choice: str | None) -> torch.device:
    try:
        device = torch.device(choice or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        fail(f"--device {choice!r} is not a torch device ({e}); use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {choice} asks for CUDA, which this machine does not have; use --device cpu")
    return device


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint = None
    if args.resume:  # the saved (resolved) flags become the defaults; flags given now override them
        if not os.path.isfile(args.resume):
            fail(f"--resume: no checkpoint at {args.resume!r} (runs/<run_name>/checkpoint.pt is written by --save-model)")
        checkpoint = load_checkpoint(args.resume)
        args = tyro.cli(Args, default=Args(**{**checkpoint["args"], "resume": args.resume}))
        for name in FIXED_ON_RESUME:
            if getattr(args, name) != checkpoint["args"][name]:
                fail(f"--resume: --{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's "
                     f"{checkpoint['args'][name]}; the saved agent was built for it, so leave it unset")
    official = require_official(args.official, URL, COMMIT)
    dql = load_script("diffusion_ql")  # data, presets, evaluation and checkpoint helpers of the script
    dql.SCRIPT = SCRIPT  # its one-line errors name this file
    # the flags shared with diffusion_ql.py, checked and resolved by its own code (same preset, same defaults)
    ours = dql.Args(dataset_id=args.dataset_id, seed=args.seed, total_timesteps=args.total_timesteps,
                    batch_size=args.batch_size, eval_frequency=args.eval_frequency, eval_episodes=args.eval_episodes,
                    log_frequency=args.log_frequency, checkpoint_frequency=args.checkpoint_frequency,
                    preset=args.preset, lr_decay=args.lr_decay, compile=False, kernels="torch")
    dql.check_args(ours)
    ours, task = dql.resolve_preset(ours)
    args = replace(args, total_timesteps=ours.total_timesteps, eval_episodes=ours.eval_episodes)
    device = resolve_device(args.device)
    Diffusion_QL = import_official(official)
    dataset = dql.load_dataset(args.dataset_id)
    dql.check_spaces(dataset, args.dataset_id)
    run_name = (checkpoint["run_name"] if checkpoint
                else f"{args.dataset_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if checkpoint else os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)
    # on resume, drop scalars logged after the checkpoint (the run redoes those steps); its own step's were saved
    writer = SummaryWriter(run_dir, purge_step=checkpoint["global_step"] + 1 if checkpoint else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # TRY NOT TO MODIFY: seeding (as diffusion_ql.py)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    data = dql.dataset_tensors(dataset, ours.reward_tune, device, ours.goal_terminals)
    buffer = ReplayBuffer(data)
    eval_envs = [dql.make_env(dataset, args.seed + 100 + i)() for i in range(args.eval_episodes)]
    metadata = dataset.storage.metadata
    ref_scores = (metadata["ref_min_score"], metadata["ref_max_score"]) if "ref_max_score" in metadata else None
    if ref_scores and not (np.all(np.isfinite(ref_scores)) and ref_scores[1] != ref_scores[0]):
        ref_scores = None  # equal or non-finite reference scores: no normalised score (it would be inf or NaN)
    obs_dim, act_dim = data["obs"].shape[1], data["actions"].shape[1]

    # the official agent, with main.py's arguments for the resolved row (see the module docstring)
    agent_kwargs = dict(state_dim=obs_dim, action_dim=act_dim, max_action=1.0, device=device, discount=ours.gamma,
                        tau=ours.tau, max_q_backup=ours.max_q_backup, eta=ours.eta, beta_schedule="vp",
                        n_timesteps=ours.diffusion_steps, ema_decay=ours.ema_decay, step_start_ema=ours.ema_start,
                        update_ema_every=ours.ema_frequency, lr=ours.lr, lr_decay=args.lr_decay,
                        lr_maxt=dql.OFFICIAL_TASKS[task][4], grad_norm=ours.grad_norm)
    agent = Diffusion_QL(**agent_kwargs)
    print(f"{args.dataset_id}: {data['obs'].shape[0]:,} transitions, obs {obs_dim}, act {act_dim}; official "
          f"Diffusion_QL from {official}, row {task}: {', '.join(f'{k} {v}' for k, v in agent_kwargs.items())}; "
          f"reward {ours.reward_tune}; {args.total_timesteps:,} steps on {device}", flush=True)
    global_step, eval_history = 0, []
    period = {k: 0.0 for k in LOSSES} | {"n": 0}  # loss sums of the current evaluation period
    if checkpoint:
        for name in AGENT_STATE + (SCHEDULERS if args.lr_decay else ()):
            getattr(agent, name).load_state_dict(checkpoint[name])
        agent.step, global_step, eval_history = checkpoint["agent_step"], checkpoint["global_step"], checkpoint["eval"]
        period = checkpoint["period"]
        dql.set_rng_states(checkpoint["rng"])
        print(f"resumed {run_name} at step {global_step:,}")

    def policy(obs: torch.Tensor) -> torch.Tensor:
        """The official sample_action, one state at a time (it samples 50 candidates of one state)."""
        return torch.as_tensor(np.stack([agent.sample_action(o.cpu().numpy()) for o in obs]), device=obs.device)

    def run_evaluation() -> None:
        global eval_seconds
        eval_start = time.time()
        with warnings.catch_warnings():  # the official F.softmax(q_value) without dim (1-d: dim 0)
            warnings.filterwarnings("ignore", message="Implicit dimension choice for softmax")
            returns = dql.evaluate(eval_envs, policy, args.seed + 100, device)
        entry = {"step": global_step, "mean_return": float(returns.mean()), "std_return": float(returns.std())}
        writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
        writer.add_scalar("eval/episodic_return_std", returns.std(), global_step)
        text = f"eval  step {global_step:>10,} | return {returns.mean():10.2f} +- {returns.std():.2f}"
        if ref_scores:  # x100 of the official get_normalized_score(mean return); std over episodes
            scores = 100 * (returns - ref_scores[0]) / (ref_scores[1] - ref_scores[0])
            entry.update(normalized_score=float(scores.mean()), normalized_score_std=float(scores.std()))
            writer.add_scalar("eval/normalized_score", scores.mean(), global_step)
            text += f" | normalized {scores.mean():6.1f} +- {scores.std():.1f}"
        if period["n"]:  # main.py's per-evaluation loss means (its offline model selection ranks by bc_loss)
            entry.update({k: period[k] / period["n"] for k in LOSSES})
        period.update({k: 0.0 for k in LOSSES}, n=0)
        eval_history.append(entry)
        eval_seconds += time.time() - eval_start
        print(f"{text} ({len(returns)} episodes)", flush=True)

    def write_summary(wall_seconds: float, sps: float | None) -> None:
        returns = [e["mean_return"] for e in eval_history]
        scores = [e["normalized_score"] for e in eval_history if e.get("normalized_score") is not None]
        summary = {"args": asdict(args), "eval": eval_history, "final_eval_return": returns[-1] if returns else None,
                   "best_eval_return": max(returns) if returns else None, "sps": sps, "wall_seconds": wall_seconds,
                   "global_step": global_step, "kernels": "torch", "precision": "ieee", "compile": False,
                   "device": str(device), "preset": task,
                   "best_normalized_score": max(scores) if scores else None,
                   "last_normalized_score": scores[-1] if scores else None,
                   "train_ms_per_step": 1000 * (time.time() - start_time - eval_seconds) / (global_step - start_step)
                   if global_step > start_step else None}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)

    def checkpoint_state() -> dict:
        names = AGENT_STATE + (SCHEDULERS if args.lr_decay else ())
        return {**{k: getattr(agent, k).state_dict() for k in names}, "agent_step": agent.step,
                "args": {**asdict(args), "resume": None}, "agent_kwargs": {**agent_kwargs, "device": str(device)},
                "run_name": run_name, "global_step": global_step, "eval": eval_history, "period": period,
                "rng": dql.rng_states(), "wall_seconds": prior_wall + time.time() - start_time}

    start_time, start_step = time.time(), global_step
    prior_wall = checkpoint["wall_seconds"] if checkpoint else 0.0
    eval_seconds = 0.0  # time spent in evaluation, left out of train_ms_per_step

    while global_step < args.total_timesteps:
        # one official train() call, ending at the next status line, evaluation, checkpoint or the end of the run
        boundaries = [args.log_frequency, args.eval_frequency] + ([args.checkpoint_frequency] if args.save_model else [])
        end = min([(global_step // f + 1) * f for f in boundaries] + [args.total_timesteps])
        evaluate_now = end % args.eval_frequency == 0 or end >= args.total_timesteps
        agent.lr_decay = args.lr_decay and evaluate_now  # main.py steps the schedulers once per evaluation period
        chunk_start = time.time()
        metric = agent.train(buffer, iterations=end - global_step, batch_size=args.batch_size, log_writer=None)
        global_step = end
        for k in LOSSES:
            period[k] += float(np.sum(metric[k]))
        period["n"] += len(metric["bc_loss"])

        # TRY NOT TO MODIFY: logging, evaluation and checkpoints at fixed gradient-step intervals
        now = time.time()
        writer.add_scalar("charts/SPS", int((global_step - start_step) / (now - start_time)), global_step)
        sps = len(metric["bc_loss"]) / max(now - chunk_start, 1e-9)  # recent: this train() call
        for k in LOSSES:
            writer.add_scalar(f"losses/{k}", float(np.mean(metric[k])), global_step)
        eta = dql.format_duration((args.total_timesteps - global_step) / sps) if sps > 0 else "?"
        last = eval_history[-1]["mean_return"] if eval_history else float("nan")
        print(f"step {global_step:>10,} | SPS {sps:>7.1f} | ETA {eta} | eval {last:10.2f} | critic_loss "
              f"{np.mean(metric['critic_loss']):.4g} | bc_loss {np.mean(metric['bc_loss']):.4g} | ql_loss "
              f"{np.mean(metric['ql_loss']):.4g}", flush=True)
        if evaluate_now:
            run_evaluation()
            write_summary(prior_wall + time.time() - start_time, (global_step - start_step) / (time.time() - start_time))
        if args.save_model and (global_step % args.checkpoint_frequency == 0 or global_step >= args.total_timesteps):
            dql.save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), checkpoint_state())

    if global_step == start_step and not eval_history:  # resumed at or past --total-timesteps before any evaluation
        run_evaluation()
        write_summary(prior_wall + time.time() - start_time, None)
    wall = time.time() - start_time
    if global_step > start_step:  # a resume with nothing left to do keeps the summary's SPS
        write_summary(prior_wall + wall, (global_step - start_step) / wall)
    final = eval_history[-1] if eval_history else {}
    print(f"done: {global_step:,} gradient steps in {wall:.0f} s; final eval return {final.get('mean_return', float('nan')):.2f}"
          + (f", normalized {final['normalized_score']:.1f}" if "normalized_score" in final else "")
          + f"; summary in {os.path.join(run_dir, 'summary.json')}")
    for env in eval_envs:
        env.close()
    writer.close()
