"""Combinations of settings that are valid one by one but cannot train together are rejected
by the config loader: exit status 2 from dgn-train, a message naming the keys and the valid
choices, before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgn_dist.config import ConfigError, load_config
from dgn_dist.train import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "synthetic_smoke.toml")
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
DGN = "optim.name=dgnopt"

CASES = [
    ([DGN, "game.info=gr", "curvature.kind=diag"],
     ["game.info='gr'", "curvature.kind='diag'", "identity, kfac, ekfac", "'fne'"]),
    ([DGN, "game.info=gr", "game.ablation=adam"],
     ["game.info='gr'", "game.ablation='adam'", "identity, kfac, ekfac"]),
    ([DGN, "curvature.kind=kfac", "curvature.damping=0"],
     ["curvature.damping", "> 0", "'kfac'", "curvature.kind='identity'"]),
    (["optim.name=ekfac", "curvature.kind=diag"],
     ["optim.name='ekfac'", "curvature.kind", "'kfac' or 'ekfac'", "'diag'"]),
    (["optim.name=ekfac", "curvature.damping=0"], ["curvature.damping", "> 0"]),
    ([DGN, "curvature.chunk_mb=-1"], ["curvature.chunk_mb", ">= 0", "0 = auto"]),
    ([DGN, "optim.dgnopt_kl_clip=-0.1"], ["optim.dgnopt_kl_clip", ">= 0"]),
    (["optim.name=adam", "game.ablation=adam"], ["game.ablation", "optim.name='dgnopt'"]),
    (["optim.name=sgd", "game.alignment_strategy=random"],
     ["game.alignment_strategy='random'", "optim.name='dgnopt'", "'fixed'"]),
    (["optim.name=adam", "game.players_per_layer=2"],
     ["game.players_per_layer=2", "'sgd'", "'dgnopt'"]),
    (["optim.name=sgd", "optim.momentum=0.9", "game.players_per_layer=2"],
     ["optim.momentum=0"]),
]


@pytest.mark.parametrize(("overrides", "needles"), CASES,
                         ids=[" ".join(c[0]) for c in CASES])
def test_bad_combinations_exit_2(overrides: list[str], needles: list[str],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", SMOKE, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("overrides", [
    [DGN, "game.info=gr", "curvature.kind=kfac"],
    [DGN, "game.info=fne", "curvature.kind=diag"],
    [DGN, "game.info=gr", "game.ablation=ekfac"],
    [DGN, "curvature.kind=identity", "curvature.damping=0"],
    ["optim.name=sgd", "curvature.kind=diag", "curvature.damping=0"],
    ["optim.name=sgd", "game.players_per_layer=2"],
])
def test_valid_combinations_load(overrides: list[str]) -> None:
    load_config(SMOKE, overrides)


def test_the_loader_agrees_with_dgnopt() -> None:
    """Whatever DGNOpt's own check rejects among info x curvature x damping, the loader
    rejects too (and accepts the rest)."""
    from dgn_dist.dgnopt import check_config
    for info in ("olne", "fne", "gr"):
        for kind in ("identity", "diag", "kfac", "ekfac"):
            for damping in (0.0, 0.1):
                overrides = [DGN, f"game.info={info}", f"curvature.kind={kind}",
                             f"curvature.damping={damping}"]
                try:
                    cfg = load_config(SMOKE, overrides)
                except ConfigError:
                    cfg = None
                with_defaults = load_config(SMOKE, [DGN])
                with_defaults.game.info = info  # type: ignore[assignment]
                with_defaults.curvature.kind = kind  # type: ignore[assignment]
                with_defaults.curvature.damping = damping
                try:
                    check_config(with_defaults)
                    dgnopt_ok = True
                except ValueError:
                    dgnopt_ok = False
                assert (cfg is not None) == dgnopt_ok, overrides


def test_rejected_before_torch_is_imported() -> None:
    probe = ("import sys; from dgn_dist.train import main; "
             f"rc = main(['--config', {SMOKE!r}, {DGN!r}, 'game.info=gr', "
             "'curvature.kind=diag']); print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.split() == ["2", "False"], out
    assert "game.info='gr'" in out.stderr
