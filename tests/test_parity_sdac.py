"""The comparison logic of benchmarks/parity/sdac.py, without JAX or the official code: sdac.py against a copy of itself.

The unperturbed copy must agree on every quantity; a copy whose math is perturbed (discount, clipping, EMA rate, lr
schedule, one weight) must be reported in exactly the quantities that perturbation reaches. JAX is blocked from
importing for the whole module, so the harness's shared logic cannot depend on it.
"""

import importlib.abc
import importlib.util
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import REPO

SHAPES = dict(obs_dim=3, act_dim=2, batch_size=8, num_particles=4, diffusion_steps=5, hidden_dim=32)
STEPS = [0, 1, 2, 3, 74_998, 74_999, 75_000]  # consecutive updates, then a jump to mid lr-decay and an alpha update


class BlockJax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "jax" or name.startswith("jax."):
            raise ImportError(f"{name} is blocked in this test")
        return None


@pytest.fixture
def harness(monkeypatch):
    for name in [m for m in sys.modules if m == "jax" or m.startswith("jax.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BlockJax(), *sys.meta_path])  # any `import jax` now raises ImportError
    path = REPO / "benchmarks" / "parity" / "sdac.py"
    spec = importlib.util.spec_from_file_location("parity_sdac_under_test", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def run(harness, perturb=None, resync=True, steps=STEPS):
    """Side "ours" vs side "reference" from the same initial state and draws; `perturb(reference)` changes one."""
    torch.manual_seed(0)
    shapes = harness.Shapes(**SHAPES)
    ours, reference = harness.ScriptSide(shapes), harness.ScriptSide(shapes)
    reference.import_state(ours.export_state())
    if perturb:
        perturb(reference)
    comparison = harness.Comparison()
    harness.compare_lr_schedules(comparison, ours, reference)
    rng = np.random.default_rng(1)
    harness.run_updates(comparison, ours, reference, shapes, steps, seed=2, resync=resync,
                        make_draws=lambda i, step: harness.numpy_draws(rng, shapes, step % 2 == 0))
    assert "jax" not in sys.modules  # nothing imported JAX
    return comparison


def with_args(**changes):
    def perturb(side):
        side.args = replace(side.args, **changes)
    return perturb


def test_identical_copies_agree_on_every_quantity(harness, capsys):
    comparison = run(harness)
    assert comparison.failures() == []
    rows = set(comparison.rows)
    for expected in ("TD target y", "TD target next action a'", "sampler output, all particles (TD target)",
                     "best-of-N index (anchor)", "reverse samples a0_hat", "score-matching weights softmax(Q / 0.2 alpha)",
                     "critic loss Q1", "policy loss (reweighted score matching)", "alpha loss", "log alpha gradient",
                     "gradients: critic 1", "gradients: denoiser", "params after update: target denoiser (EMA)",
                     "Adam second moment: denoiser", "Adam update vector given the official gradients (torch Adam vs optax)",
                     "policy lr", "policy lr schedule (11 policy-update counts, 0 to 100k)",
                     "reverse samples a0_hat from the official x_t"):
        assert expected in rows, expected
    assert comparison.rows["alpha loss"][2] == 2  # steps 0 and 75,000
    assert comparison.report("self") == 0
    assert "OK:" in capsys.readouterr().out


@pytest.mark.parametrize("perturb, must_fail, must_pass", [
    (with_args(gamma=0.98), ["TD target y", "critic loss Q1", "gradients: critic 2", "params after update: critic 1"],
     ["TD target next action a'", "sampler output, all particles (TD target)", "policy loss (reweighted score matching)"]),
    (with_args(clip_actions=True), ["TD target next action a'", "TD target y"],
     ["sampler output, all particles (TD target)", "anchor a~ (best-of-N + noise)"]),
    (with_args(tau=0.006), ["params after update: target critic 1 (EMA)", "params after update: target denoiser (EMA)"],
     ["params after update: critic 1", "gradients: denoiser"]),
    (with_args(policy_lr_end=3.1e-5), ["policy lr", "policy lr schedule (11 policy-update counts, 0 to 100k)"],
     ["policy loss (reweighted score matching)", "gradients: denoiser"]),
    (with_args(noise_scale=0.1001), ["TD target next action a'", "anchor a~ (best-of-N + noise)", "alpha loss"],
     ["sampler output, all particles (anchor)", "best-of-N index (TD target)"]),
])
def test_a_perturbed_copy_is_reported(harness, capsys, perturb, must_fail, must_pass):
    comparison = run(harness, perturb)
    failures = comparison.failures()
    for name in must_fail:
        assert name in failures, (name, failures)
    for name in must_pass:
        assert name not in failures, (name, failures)
    assert comparison.report("perturbed") == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_a_weight_nudge_is_reported_without_resync(harness):
    """Free-running, a 1e-4 change of one critic weight is reported in that critic's params; with resync (the reference's
    state is copied into ours before every update) the same nudge is invisible: both start from the nudged state."""
    def nudge(side):
        with torch.no_grad():
            side.agent.qf1.net[2].weight[0, 0] += 1e-4
    free = run(harness, nudge, resync=False, steps=[0, 1])
    assert "params after update: critic 1" in free.failures()
    assert run(harness, nudge, resync=True, steps=[0, 1]).failures() == []


def test_a_quantity_reported_by_one_side_only_is_a_mismatch(harness):
    comparison = harness.Comparison()
    harness.compare_update(comparison, {"TD target y": np.ones(3), "extra": np.ones(1)}, {"TD target y": np.ones(3)})
    assert comparison.failures() == ["missing on one side: extra"]


def test_haiku_port_round_trips_exactly(harness):
    torch.manual_seed(3)
    side = harness.ScriptSide(harness.Shapes(**SHAPES))
    tree = side.params()
    other = harness.ScriptSide(harness.Shapes(**SHAPES))
    other.load_params(tree, 0.5)
    for net, layers in other.params().items():
        for name, layer in layers.items():
            assert np.array_equal(layer["w"], tree[net][name]["w"]) and np.array_equal(layer["b"], tree[net][name]["b"])
    assert tree["policy"]["dacer_policy_net/linear_2"]["w"].shape == (3 + 2 + 16, 32)  # haiku [in, out]: [obs, x, temb]
    assert float(other.agent.log_alpha.detach()) == 0.5
