"""``dgn-bench parity`` (dgn_dist.parity): it fails on a difference above its tolerance and on a
diverged reference, and rejects bad input. (On a GPU machine it compares CUDA with the CPU;
here both runs are on the CPU, so the difference is planted.)"""

from __future__ import annotations

import pytest
import torch

from dgn_dist import parity


def test_identical_runs_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert parity.main(["--device", "cpu", "--optimizers", "sgd,dgnopt", "--steps", "1",
                        "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == 2 and "FAIL" not in out


def test_a_planted_difference_fails(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    real = parity.run_steps
    calls: list[int] = []

    def second_run_off_by_1e4(*args: object) -> list[torch.Tensor]:
        params = real(*args)  # type: ignore[arg-type]
        calls.append(1)
        return [p * (1 + 1e-4) for p in params] if len(calls) % 2 == 0 else params

    monkeypatch.setattr(parity, "run_steps", second_run_off_by_1e4)
    assert parity.main(["--device", "cpu", "--optimizers", "sgd", "--steps", "1",
                        "--batch-size", "8"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1.000e-04" in out


def test_a_diverged_reference_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """DGNOpt on the MNIST net at batch 6 with the default damping diverges (README: small
    batches need more damping); equal diverged runs are not a pass."""
    assert parity.main(["--device", "cpu", "--model", "mnist_resnet", "--optimizers", "dgnopt",
                        "--steps", "3", "--batch-size", "6"]) == 1
    out = capsys.readouterr().out
    assert "difference inf" in out and "FAIL" in out


def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert parity.main(["--device", "cpu", "--optimizers", "sgd,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert parity.main(["--device", "cpu", "--steps", "0"]) == 2
    if not torch.cuda.is_available():
        assert parity.main(["--device", "cuda"]) == 2
        assert "no GPU" in capsys.readouterr().err
