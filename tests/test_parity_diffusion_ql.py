"""The Diffusion-QL parity harness (benchmarks/parity/diffusion_ql.py) without the official code: the script against
itself must pass, and each planted difference must be reported as a mismatch, so the harness cannot pass silently."""


import pytest
import torch

from helpers import load_module, run_harness

SMALL = ["--self-test", "--updates", "6", "--batch-size", "64", "--transitions", "500", "--init-draws", "3",
         "--eval-states", "2"]


@pytest.fixture(scope="module")
def harness():
    return load_module("benchmarks/parity/diffusion_ql.py", "parity_diffusion_ql")


def run(harness, capsys, *extra) -> tuple[int, str]:
    return run_harness(harness, capsys, [*SMALL, *extra])


def test_script_against_itself_passes_with_every_quantity_compared(harness, capsys):
    code, out = run(harness, capsys)
    assert code == 0, out
    assert "OK: " in out and "MISMATCH" not in out
    assert "EMA moved at steps [1000]" in out  # steps 996..1001: the EMA start is inside the compared updates
    for row in ("| critic_loss |", "| bc_loss |", "| ql_loss |", "| lr_actor |", "grad before clip: actor",
                "grad after clip: qf1", "param after step: ema_actor", "param after step: qf2_target",
                "Adam moments: actor", "eval: chosen action", "lr factor at each evaluation", "init under one seed"):
        assert row in out, row


@pytest.mark.parametrize("perturbation, reported", [
    ("gamma", "grad before clip: qf1"),  # discount x (1 + 1e-4) on one side: the critic gradients differ
    ("ema_decay", "param after step: ema_actor"),  # EMA decay 0.99 instead of 0.995: only visible from step 1000
    ("eval_softmax", "eval: softmax(min Q_target) over candidates"),  # temperature 1.01 at evaluation
])
def test_a_planted_difference_is_reported(harness, capsys, perturbation, reported):
    code, out = run(harness, capsys, "--perturb", perturbation)
    assert code == 1, out
    mismatch = next(line for line in out.splitlines() if line.startswith("MISMATCH"))
    assert reported in mismatch, mismatch


def test_scripted_draws_are_each_used_once_with_the_asked_shape(harness):
    rng = harness.ScriptedRNG({"randn": [torch.zeros(2, 3)], "randint": [torch.tensor([0, 4])]})
    with pytest.raises(AssertionError, match="shape"):
        with rng.active():
            torch.randn(3, 2)
    with pytest.raises(AssertionError, match="outside"):  # 4 is not a valid index into 4 transitions
        with harness.ScriptedRNG({"randint": [torch.tensor([0, 4])]}).active():
            torch.randint(0, 4, (2,))
    with pytest.raises(AssertionError, match="left unused"):
        with harness.ScriptedRNG({"randn": [torch.zeros(2), torch.zeros(2)]}).active():
            torch.randn(2)
    with pytest.raises(AssertionError, match="unexpected extra call"):
        with harness.ScriptedRNG({}).active():
            torch.randn_like(torch.zeros(1))
    assert torch.randn(2).shape == (2,)  # the real RNG is back after each context


def test_official_draw_order_serves_the_reverse_chain_noise_last_step_first(harness):
    """The official p_sample_loop draws its per-step noise with randn_like for t = T-1 .. 0; the script draws it as
    one [T, N, A] tensor indexed by t. The official queue must therefore list noise[T-1] first."""
    gen = torch.Generator().manual_seed(0)
    d = harness.make_draws(gen, n=10, batch=4, backup=1, steps=5, act_dim=2)
    like = harness.official_queues(d)["randn_like"]
    assert len(like) == 5 + 1 + 5  # critic chain, eps, actor chain
    assert torch.equal(like[0], d["critic_noise"][4]) and torch.equal(like[4], d["critic_noise"][0])
    assert torch.equal(like[5], d["eps"]) and torch.equal(like[6], d["actor_noise"][4])
    ours = harness.ours_queues(d)["randn"]
    assert torch.equal(ours[1], d["critic_noise"]) and torch.equal(ours[4], d["actor_noise"])


def test_missing_official_checkout_prints_how_to_get_it(harness, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        harness.main(["--official", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "git clone https://github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL" in err
    assert "checkout d871f5c" in err
