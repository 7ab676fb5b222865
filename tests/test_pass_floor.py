"""``dgn-bench floor`` (:mod:`dgn_dist.pass_floor`): the floor ``B + 3F`` of DGNOpt's passes
on top of EKFAC against the budget a step-time target leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgn_dist.bench import main as bench_main
from dgn_dist.pass_floor import Floor, format_floor


def _floor(forward: float, backward: float, ekfac: float) -> Floor:
    return Floor("m", 8, forward_s=forward, backward_s=backward, input_backward_s=backward / 2,
                 ekfac_step_s=ekfac, dgnopt_step_s=2 * ekfac, ratio=1.2)


def test_floor_is_one_backward_and_three_forwards_against_the_budget() -> None:
    f = _floor(forward=1.0, backward=2.5, ekfac=20.0)
    assert f.floor_s == pytest.approx(5.5) and f.budget_s == pytest.approx(4.0)
    text = format_floor(f)
    assert "floor / budget = 1.38" in text and "out of reach" in text
    assert "2.00x EKFAC" in text
    within = _floor(forward=1.0, backward=2.5, ekfac=40.0)  # budget 8 s > floor 5.5 s
    assert "floor / budget = 0.69" in format_floor(within)
    assert "out of reach" not in format_floor(within)


def test_floor_command_measures_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "floor.json"
    assert bench_main(["floor", "--models", "digits_resnet", "--batch-size", "8", "--repeats",
                       "1", "--steps", "1", "--warmup", "0", "--device", "cpu", "--json",
                       str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["model"] == "digits_resnet" and row["batch_size"] == 8
    for key in ("forward_s", "backward_s", "input_backward_s", "ekfac_step_s", "dgnopt_step_s"):
        assert row[key] > 0, key
    assert row["floor_s"] == pytest.approx(row["backward_s"] + 3 * row["forward_s"])
    assert row["budget_s"] == pytest.approx(0.2 * row["ekfac_step_s"])
    assert "floor of DGNOpt's additions" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--repeats", "0"], ["--ratio", "1"]])
def test_floor_rejects_bad_arguments(args: list[str]) -> None:
    assert bench_main(["floor", *args]) == 2
