"""dgn-train's command line: flag surface, exit status 2 for user errors, --print-config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgn_dist.config import config_from_dict, load_config
from dgn_dist.config.loader import tomllib
from dgn_dist.train import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "synthetic_smoke.toml")
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_flag_surface_is_frozen() -> None:
    """Adding a flag is a design decision: update this list on purpose, not by accident."""
    actions = build_parser()._actions
    flags = {s for a in actions for s in a.option_strings}
    assert flags == {"-h", "--help", "--config", "--print-config", "--print-game"}
    assert [a.dest for a in actions if not a.option_strings] == ["overrides"]


@pytest.mark.parametrize(("override", "needles"), [
    ("run.bogus=1", ["run.bogus", "valid keys", "epochs"]),
    ("run.epochs=many", ["run.epochs", "integer"]),
    ("optim.name=bogus", ["optim.name", "'sgd'", "'ekfac'", "'dgnopt'"]),
    ("bogus.key=1", ["bogus", "valid sections", "optim"]),
    ("optim.lr=-1", ["optim.lr", "> 0"]),
    ("run.epochs", ["section.key=value"]),
    ("run.cpu_allocator=fast", ["run.cpu_allocator", "'retain'", "'system'"]),
], ids=["unknown-key", "bad-type", "bad-choice", "unknown-section", "bad-range", "no-value",
        "bad-allocator"])
def test_config_errors_exit_2(override: str, needles: list[str],
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", SMOKE, override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, (needle, err)


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_resume_latest_needs_a_run_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", SMOKE, "run.resume=latest"]) == 2
    assert "run.dir" in capsys.readouterr().err


def test_bad_config_fails_fast_without_importing_torch() -> None:
    probe = ("import sys; from dgn_dist.train import main; "
             f"rc = main(['--config', {SMOKE!r}, 'optim.name=bogus']); "
             "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.split() == ["2", "False"], out
    cli = subprocess.run([sys.executable, "-m", "dgn_dist.train", "--config", SMOKE,
                          "optim.name=bogus"], env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 2 and "optim.name" in cli.stderr and not cli.stdout


def test_print_config_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", SMOKE, "--print-config", "optim.lr=0.25", "run.name=x"]) == 0
    text = capsys.readouterr().out
    printed = tomllib.loads(text)
    assert printed["optim"]["lr"] == 0.25
    assert re.fullmatch(r"runs/x-\d{8}-\d{6}", printed["run"]["dir"])
    expected = load_config(SMOKE, ["optim.lr=0.25", "run.name=x",
                                   f"run.dir={printed['run']['dir']}"])
    assert config_from_dict(printed) == expected


def test_missing_dataset_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--config", SMOKE, "data.dataset=mnist", f"data.root={tmp_path / 'data'}",
               f"run.dir={tmp_path / 'run'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mnist" in err.lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", SMOKE, "run.device=cuda", f"run.dir={tmp_path}"]) == 2
    assert "run.device" in capsys.readouterr().err


def test_train_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", SMOKE, f"run.dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.count("epoch ") == 1 and "done: test acc" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 15 and summary["test_acc"] > 50.0  # 4 classes: chance 25%


def test_print_game(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--config", SMOKE, "--print-game", "data.dataset=digits",
               "model.name=digits_resnet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.strip().splitlines()
    assert lines and all(line.startswith("stage") for line in lines)
    assert "(1, 1, 8, 8)" in lines[0]  # the example input's state shape


def test_print_game_shows_fictitious_players(capsys: pytest.CaptureFixture[str]) -> None:
    """game.players_per_layer = 3: every layer appears as its three players (eq. 16), each
    with the layer's parameter count."""
    args = ["--config", SMOKE, "--print-game", "data.dataset=digits",
            "model.name=digits_resnet"]
    assert main(args) == 0
    plain = capsys.readouterr().out.strip().splitlines()
    assert main([*args, "game.players_per_layer=3"]) == 0
    split = capsys.readouterr().out.strip().splitlines()
    assert len(split) == len(plain)
    for before, after in zip(plain, split, strict=True):
        names = re.findall(r"([\w.]+)\[kron, g\d+, (\d+)\]", before)
        assert names
        for name, size in names:
            copies = re.findall(rf"{re.escape(name)}\.players\.(\d)\[kron, g\d+, {size}\]",
                                after)
            assert copies == ["0", "1", "2"], (name, after)


def test_bench_runs_one_tiny_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dgn_dist import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--models", "digits_resnet", "--optimizers", "adam", "--steps", "1",
                       "--warmup", "0", "--batch-size", "4", "--device", "cpu",
                       "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "digits_resnet" in table and "adam" in table
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["optimizer"]) for r in rows] == [("digits_resnet", "sgd"),
                                                            ("digits_resnet", "adam")]
    assert rows[0]["time_ratio"] == 1.0 and rows[1]["median_ms"] > 0
    assert rows[1]["time_ratio"] == pytest.approx(rows[1]["median_ms"] / rows[0]["median_ms"])
    assert bench.main(["--models", "nope"]) == 2
    assert "valid choices" in capsys.readouterr().err


def test_bench_variants_carry_their_settings() -> None:
    """``dgnopt-gr`` is GR; ``dgnopt-recipe`` is FNE with the DIGITS recipe's closed-loop
    settings at the benchmark's shared damping (the same as EKFAC's there)."""
    from dgn_dist.bench import OPTIM_CHOICES, bench_config
    from dgn_dist.config.recipes import DGNOPT_RECIPE

    assert {"dgnopt-gr", "dgnopt-recipe"} <= set(OPTIM_CHOICES)
    gr, recipe, ekfac = (bench_config("resnet18", n, lr=0.01)
                         for n in ("dgnopt-gr", "dgnopt-recipe", "ekfac"))
    assert (gr.optim.name, gr.game.info, gr.game.feedback_consistency) == ("dgnopt", "gr", False)
    assert (recipe.optim.name, recipe.game.info) == ("dgnopt", "fne")
    assert (recipe.optim.dgnopt_kl_clip, recipe.game.feedback_consistency,
            recipe.curvature.rescale) == (1e-3, True, False)
    assert len(DGNOPT_RECIPE) == 3 and recipe.curvature.damping == ekfac.curvature.damping
    assert recipe.model.name == "resnet18" and recipe.optim.lr == 0.01


def test_bench_counts_operators(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--count-ops``: operators of one step per pair; Adam dispatches more than SGD, and
    DGNOpt (the sweep and the update pass) far more."""
    from dgn_dist import bench
    from dgn_dist.opcount import count_operators

    out = tmp_path / "bench.json"
    assert bench.main(["--models", "digits_resnet", "--optimizers", "adam,dgnopt", "--steps",
                       "1", "--warmup", "1", "--batch-size", "4", "--device", "cpu",
                       "--count-ops", "--json", str(out)]) == 0
    assert "ops/step" in capsys.readouterr().out
    ops = {r["optimizer"]: r["ops_per_step"] for r in json.loads(out.read_text())["results"]}
    assert 0 < ops["sgd"] < ops["adam"] < ops["dgnopt"] / 5, ops
    import torch

    x = torch.ones(3)
    assert count_operators(lambda: (x + 1) * 2) == 2


def test_diverged_run_exits_1_with_what_to_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import dgn_dist.trainer
    from dgn_dist.dgnopt.skips import TrainingDiverged

    def diverge(cfg: object) -> None:
        raise TrainingDiverged("DGNOpt skipped step 7 (...): the run has diverged. Restart "
                               "from a checkpoint with a lower optim.lr")

    monkeypatch.setattr(dgn_dist.trainer, "train", diverge)
    assert main(["--config", SMOKE, f"run.dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "error: DGNOpt skipped step 7" in err and "lower optim.lr" in err
