"""The QVPO parity harness (benchmarks/parity/qvpo.py) without the official code: qvpo.py against a second copy of
itself must pass with every quantity compared, each planted difference must be reported, and the injected random
draws must be consumed exactly as generated, so the harness cannot pass silently."""

import pytest
import torch
from helpers import load_module, run_harness

SMALL = ["--self-test", "--updates", "2", "--init-draws", "2"]


@pytest.fixture(scope="module")
def harness():
    return load_module("benchmarks/parity/qvpo.py", "parity_qvpo")


def run(harness, capsys, *extra) -> tuple[int, str]:
    return run_harness(harness, capsys, [*SMALL, *extra])


def test_script_against_itself_passes_with_every_quantity_compared(harness, capsys):
    code, out = run(harness, capsys)
    assert code == 0, out
    assert "OK: 139 quantities within max rel diff 1e-05" in out and "MISMATCH" not in out
    assert "OK: every layer's init agrees" in out
    for row in ("| omega |", "| TD target |", "| critic loss Q1 |", "| actor candidates min Q |", "| weight w(s) |",
                "| loss rows: eps_pred |", "| actor loss |", "| critic lr |", "| running Q std |",
                "| grad before clip.qf1.net.0.weight |", "| grad after clip.actor.net.6.bias |",
                "| param after step.qf2.net.4.weight |", "| param after step.target.actor.time_mlp.0.weight |",
                "| evaluation action (best of eval_samples) |", "| behaviour action (best of behavior_samples) |",
                "| omega schedule (steps 10k..1M) |", "| actor.net.0.weight | 46 |"):
        assert row in out, row
    # a copy of the same code on the same draws: every difference is exactly 0
    rows = [line for line in out.splitlines() if line.endswith("| yes |") and len(line.split("|")) == 7]
    assert len(rows) == 139 and all(line.split("|")[3].strip() == "0" for line in rows)


@pytest.mark.parametrize("perturbation, reported", [
    ("gamma", "TD target"),  # discount 0.98 on one side: the TD target and all that follows
    ("tau", "param after step.target.actor.net.0.weight"),  # only the EMA targets move differently
    ("q_weights", "weight w(s)"),  # w(s) x (1 + 1e-4): only the actor's loss and step
    ("init", "MISMATCH in the init of ['actor.time_mlp.0.weight'"),  # every initial weight x 1.25
])
def test_a_planted_difference_is_reported(harness, capsys, perturbation, reported):
    code, out = run(harness, capsys, "--perturb", perturbation)
    assert code == 1, out
    mismatches = [line for line in out.splitlines() if line.startswith("MISMATCH")]
    assert any(reported in line for line in mismatches), mismatches
    if perturbation == "q_weights":  # the critic step comes first and is untouched
        assert "critic loss" not in mismatches[0] and "grad before clip.qf1" not in mismatches[0]


def test_truncation_analysis_flags_only_the_truncated_rows(harness, capsys):
    code, out = run(harness, capsys, "--keep-truncation-fix")
    assert code == 0, out
    assert "| TD target, rows without a truncation | 2 | 0 | 0 | yes |" in out
    assert "| TD target, truncated rows, vs official + gamma min Q'(s', a') | 2 | 0 | 0 | yes |" in out
    assert "TD target, truncated rows (the fix, expected to differ;" in out and "| **no** |" in out


def test_injected_draws_must_be_used_once_in_order_with_their_shape(harness):
    queue = harness.DrawQueue("side")
    queue.push("randn", torch.zeros(2, 3))
    with pytest.raises(AssertionError, match=r"randn\(3, 2\).*randn\(2, 3\) \(high=None\) was expected"):
        with harness.injected(queue):
            torch.randn(3, 2)
    queue = harness.DrawQueue("side")
    queue.push("randint", torch.tensor([1, 2]), 10)
    with pytest.raises(AssertionError, match="high=5"):
        with harness.injected(queue):
            torch.randint(0, 5, (2,))
    queue = harness.DrawQueue("side")
    queue.push("randn", torch.ones(4))
    queue.push("rand", torch.ones(4))
    with pytest.raises(AssertionError, match="1 expected RNG calls were not made"):
        with harness.injected(queue):
            assert torch.equal(torch.randn(4), torch.ones(4))
    with pytest.raises(AssertionError, match="unexpected extra RNG call"):
        with harness.injected(harness.DrawQueue("side")):
            torch.randn_like(torch.zeros(3))
    assert torch.randn(5).shape == (5,) and torch.rand(2).max() < 1  # the real functions are back


def test_missing_official_checkout_prints_how_to_get_it(harness, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        harness.main(["--official", str(tmp_path / "qvpo")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "git clone https://github.com/wadx2019/qvpo" in err and "checkout 40a1974" in err
