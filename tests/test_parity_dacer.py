"""The parity harness benchmarks/parity/dacer.py without JAX or the official code: the script against a second copy
of itself. Unperturbed, every quantity agrees; each deliberate perturbation must be reported in the rows it touches.
So the harness cannot pass silently (a missing tap, a comparison that compares nothing, a lost quantity)."""

import os
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, load_module

PARITY = os.path.join(REPO, "benchmarks", "parity")


sys.path.append(PARITY)  # after the repo root, whose scripts share the harnesses names
harness = load_module("benchmarks/parity/dacer.py", "parity_dacer_harness")
common = sys.modules["common"]

SETUP = harness.Setup(obs_dim=5, act_dim=2, hidden=32, batch=16, entropy_samples=8, alpha_every=2, updates=4)


@pytest.fixture(scope="module")
def inputs():
    torch.set_num_threads(1)
    ours = harness.load_script("dacer")
    init = harness.script_init(ours, SETUP)
    batches, draws = harness.make_batches(SETUP), harness.numpy_draws(SETUP)
    seeds = [100 + i for i in range(SETUP.updates)]
    return ours, init, batches, draws, seeds, harness.script_run(ours, SETUP, init, batches, draws, seeds)


def reference_copy():
    """A second, independent import of dacer.py (its module globals can be perturbed without touching the first)."""
    return load_module("dacer.py", "dacer_reference_copy")


def run_reference(inputs, perturb=None, **overrides):
    ours, init, batches, draws, seeds, mine = inputs
    ref_module = reference_copy()
    if perturb:
        perturb(ref_module)
    ref = harness.script_run(ref_module, SETUP, init, batches, draws, seeds, **overrides)
    comparison = common.Comparison()
    harness.compare(ours, mine, ref, comparison)
    return comparison


def test_unperturbed_copy_agrees_on_every_quantity(inputs):
    comparison = run_reference(inputs)
    assert comparison.failures() == []
    rows = {row for _, row in harness.ROWS}
    official_only = {row for key, row in harness.ROWS if key in ("entropy.formula",)}
    assert rows - official_only <= set(comparison.rows), sorted(rows - set(comparison.rows))
    # every row compared something, and the per-update rows saw every update
    assert all(count > 0 for _, _, count in comparison.rows.values())
    assert comparison.rows["critic 1 loss (DSAC-T)"][2] == SETUP.updates
    assert comparison.rows["actor loss -mean min(Q1, Q2) (policy updates)"][2] == SETUP.updates // 2
    assert comparison.rows["entropy formula per state, identical mixture parameters"][2] == SETUP.updates // 2
    assert comparison.report("self") == 0
    assert "jax" not in sys.modules  # the CI path never needs JAX


def scale_beta_max(module):
    original = module.vp_beta_schedule
    module.vp_beta_schedule = lambda steps, low, high: original(steps, low, high * 1.001)


def noise_at_last_step(module):  # the sampler adds posterior noise at t = 0 too
    original = module.reverse_chain

    def chain(denoiser, schedule, obs, x, noise, backend="torch"):
        return original(denoiser, schedule, obs, x, noise, backend) + 0.01 * noise[0]

    module.reverse_chain = chain


def dsac_epsilon(module):
    original = module.dsac_critic_loss
    module.dsac_critic_loss = lambda *a, **kw: original(*a, **{**kw, "epsilon": 0.1001})


def entropy_formula(module):
    original = module.gmm_entropy
    module.gmm_entropy = lambda weights, covs: original(weights, covs) + 1e-4


def actor_input_scaled(module):  # the policy loss sees actions 1e-4 off the sampled ones
    original = module.update_actor
    module.update_actor = lambda actor, opt, qf1, qf2, obs, actions: original(actor, opt, qf1, qf2, obs, actions * 1.0001)


@pytest.mark.parametrize("perturb, overrides, must_fail", [
    (scale_beta_max, {}, ["sampler: reverse chain alone (T=20, clipped x0, no noise at t=0)",
                          "sampler: TD target's next action (+ 0.15 alpha noise, clip)", "gradients denoiser"]),
    (noise_at_last_step, {}, ["sampler: reverse chain alone (T=20, clipped x0, no noise at t=0)"]),
    (dsac_epsilon, {}, ["critic 1 loss (DSAC-T)", "DSAC-T mean term: dL1/d mean", "DSAC-T std term",
                        "gradients critic 1"]),
    (entropy_formula, {}, ["entropy formula per state, identical mixture parameters",
                           "entropy estimate (same mixture fit on both sides)", "gradient log alpha"]),
    (actor_input_scaled, {}, ["actor loss", "gradients denoiser"]),
    (None, {"tau": 0.00501}, ["target critic 1 (EMA tau = 0.005, every 2nd update)", "target critic 2 (EMA)"]),
    (None, {"q_lr": 1.001e-4}, ["Adam update critic 1", "learning rates", "parameters critic 1 after the update"]),
    (None, {"gamma": 0.9899}, ["TD target y = 0.2 r + gamma (1 - d) min(mean')", "critic 1 loss (DSAC-T)"]),
    (None, {"noise_scale": 0.1501}, ["sampler: TD target's next action (+ 0.15 alpha noise, clip)"]),
], ids=["beta-schedule", "noise-at-t0", "dsac-epsilon", "entropy-formula", "actor-input", "tau", "q-lr", "gamma",
        "noise-scale"])
def test_perturbation_is_reported(inputs, perturb, overrides, must_fail):
    comparison = run_reference(inputs, perturb, **overrides)
    failures = comparison.failures()
    for needle in must_fail:
        assert any(row.startswith(needle) for row in failures), (needle, failures)
    assert comparison.report("perturbed") == 1
    assert harness.explain(comparison, 3e-2) == 1  # none of these is one of the explained rounding causes


def test_missing_quantity_on_the_script_side_is_an_error(inputs):
    *_, mine = inputs
    ref = [dict(rec) for rec in mine]
    lost = [{k: v for k, v in rec.items() if k != "td_target"} for rec in mine]
    with pytest.raises(ValueError, match="td_target"):
        harness.compare(inputs[0], lost, ref, common.Comparison())


def test_explain_accepts_only_measured_causes():
    identical = harness.IDENTICAL
    c = common.Comparison()
    c.add(identical + "torch vs optax, both float64", np.ones(3), np.ones(3))
    c.add(identical + "torch float32 vs torch float64", np.ones(3), np.ones(3))
    c.add(identical + "optax float32 vs optax float64", np.array([1 + 1e-5]), np.ones(1))
    c.add(identical + "torch vs optax, both float32", np.array([1 + 1e-5]), np.ones(1))
    c.add("gradients critic 1 (8 tensors)", np.ones(3), np.ones(3))
    c.add("Adam update critic 1", np.array([1e-4, 1e-6]), np.array([1e-4 + 1e-6, 1e-6]))  # 1% of a step
    assert harness.explain(c, 1e-4) == 0
    c.add("Adam update critic 2", np.array([1e-4]), np.array([2e-4]))  # a whole step apart: not rounding
    assert harness.explain(c, 1e-4) == 1
    c2 = common.Comparison()  # the same row without its premise (no float64 agreement measured)
    c2.add(identical + "torch vs optax, both float32", np.array([1 + 1e-5]), np.ones(1))
    assert harness.explain(c2, 1e-4) == 1
    c3 = common.Comparison()
    c3.add("critic 1 loss (DSAC-T)", np.array([1.001]), np.ones(1))
    assert harness.explain(c3, 1e-4) == 1


def test_missing_official_checkout_prints_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dacer.py", "--official", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as exit_info:
        harness.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "git clone https://github.com/happy-yan/DACER-Diffusion-with-Online-RL" in err and "848c1f2" in err
