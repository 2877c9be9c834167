"""The --compile fallback of the scripts that compile (diffusion_ql.py, dtql.py, sdac.py): a failed torch.compile
must cost one warning line and leave the math to the eager function, never abort the run."""

import importlib

import pytest
import torch


@pytest.mark.parametrize("script", ["diffusion_ql", "dtql", "sdac"])
def test_compile_or_eager_falls_back_with_one_warning(script, monkeypatch, capsys):
    module = importlib.import_module(script)

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler\nlong inductor log")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    double = module.compile_or_eager(lambda v: 2 * v)
    assert double(3) == 6 and double(4) == 8
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile failed (RuntimeError: no C++ compiler)") == 1 and "long" not in err
