"""Precision and clipping settings of distributed runs: DeepSpeed JSONs are read (bf16,
gradient_clipping, ZeRO stage) or rejected with the key named; bf16 autocast trains with
curvature in float32; gradient clipping bounds the update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dgn_dist.config import ConfigError, load_config
from dgn_dist.distributed.training import (
    DeepSpeedSettings,
    autocast_dtype,
    read_deepspeed_json,
)
from dgn_dist.train import main

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "synthetic_smoke.toml"


def test_shipped_deepspeed_jsons_are_read() -> None:
    assert read_deepspeed_json(str(ROOT / "configs/deepspeed/zero1.json")) == \
        DeepSpeedSettings(bf16=False, gradient_clipping=1.0, zero_stage=1)
    assert read_deepspeed_json(str(ROOT / "configs/deepspeed/bf16_zero1.json")).bf16


@pytest.mark.parametrize(("content", "needle"), [
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage"),
    ([1, 2], "JSON object"),
])
def test_bad_deepspeed_json_is_rejected(tmp_path: Path, content: object, needle: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=needle):
        read_deepspeed_json(str(path))


def test_missing_deepspeed_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--config", str(CONFIG), f"run.dir={tmp_path}",
                 "parallel.deepspeed_config=nope.json"])
    assert code == 2
    assert "parallel.deepspeed_config" in capsys.readouterr().err


def test_precision_follows_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(CONFIG, [])
    cpu = torch.device("cpu")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert autocast_dtype(cfg, cpu, DeepSpeedSettings()) is None
    assert autocast_dtype(cfg, cpu, DeepSpeedSettings(bf16=True)) is torch.bfloat16
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert autocast_dtype(cfg, cpu, DeepSpeedSettings()) is torch.bfloat16
    cfg.parallel.precision = "fp32"
    assert autocast_dtype(cfg, cpu, DeepSpeedSettings(bf16=True)) is None


def _train(tmp_path: Path, *overrides: str) -> dict[str, object]:
    from dgn_dist.trainer import train

    cfg = load_config(CONFIG, [f"run.dir={tmp_path}", "run.max_steps=6", *overrides])
    return train(cfg)


@pytest.mark.parametrize("optimizer", ["sgd", "dgnopt"])
def test_bf16_autocast_trains_with_float32_curvature(tmp_path: Path, optimizer: str) -> None:
    summary = _train(tmp_path, f"optim.name={optimizer}", "parallel.precision=bf16",
                     "curvature.damping=0.3", "optim.lr=0.05")
    assert isinstance(summary["train_loss"], float) and summary["train_loss"] < 2.0
    from dgn_dist.game.training import EXPORT_NAME

    params = torch.load(tmp_path / EXPORT_NAME, weights_only=True)
    assert all(v.dtype == torch.float32 for v in params.values() if v.is_floating_point())
    if optimizer == "dgnopt":
        state = torch.load(tmp_path / "checkpoints" / "step-6.pt", weights_only=True)
        tensors = [v for v in _flatten(state["optimizer"]["state"]) if v.is_floating_point()]
        assert tensors and all(t.dtype == torch.float32 for t in tensors)


def _flatten(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flatten(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flatten(v)]
    return []


def test_gradient_clipping_bounds_the_sgd_step(tmp_path: Path) -> None:
    """With lr 1 and clip c, one plain SGD step moves the parameters by at most c."""
    from dgn_dist.game.training import EXPORT_NAME

    args = ["optim.name=sgd", "optim.lr=1.0", "optim.momentum=0", "run.max_steps=1"]
    _train(tmp_path / "free", *args)
    _train(tmp_path / "clipped", *args, "parallel.grad_clip=0.01")
    _train(tmp_path / "start", *args, "optim.lr=1e-30")
    start = torch.load(tmp_path / "start" / EXPORT_NAME, weights_only=True)
    for name, bound in (("free", None), ("clipped", 0.01)):
        end = torch.load(tmp_path / name / EXPORT_NAME, weights_only=True)
        step = torch.sqrt(sum(((end[k] - start[k]) ** 2).sum() for k in start))
        if bound is None:
            assert step > 0.05
        else:
            assert step == pytest.approx(bound, rel=1e-3)
