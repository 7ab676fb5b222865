"""The curvature dashboard: the layout, and a real TensorBoard serving a DGNOpt run."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from dist_helper import free_port
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dgn_dist.dashboard import DashboardWriter, build_layout
from dgn_dist.train import main as dgn_train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TENSORBOARD = Path(sys.executable).parent / "tensorboard"
DGN_TAGS = ["value/terminal/Vx_norm", "value/4/Vx_norm", "value/2_1/Vx_norm",
            "value/2_1/clipped_frac", "update/0/open_norm", "update/0/feedback_norm",
            "update/0/feedback_ratio", "curvature/0/A_eig_max", "curvature/0/G_eig_min",
            "curvature/0/A_cond", "curvature/0/damping", "curvature/2.conv1/A_cond",
            "coop/2_1/cross_ratio"]


def _matches(patterns: list[str], tags: list[str]) -> list[str]:
    return [t for t in tags if any(re.match(p, t) for p in patterns)]


def test_layout_groups_tags_by_player_and_stage() -> None:
    layout = build_layout(DGN_TAGS + ["loss/train", "time/step"])
    assert list(layout) == ["training", "all players and stages", "player 0",
                            "player 2.conv1", "stage 2_1", "stage 4", "stage terminal",
                            "schedule, time, communication, bandit"]
    player = layout["player 0"]
    assert player["curvature: eigenvalues"] == ["Multiline", ["^curvature/0/A_eig_max$",
                                                              "^curvature/0/G_eig_min$"]]
    assert list(player) == ["curvature: eigenvalues", "curvature: condition numbers",
                            "curvature: damping", "update: update norms",
                            "update: feedback_ratio"]
    assert _matches(player["update: update norms"][1], DGN_TAGS) == [
        "update/0/open_norm", "update/0/feedback_norm"]
    stage = layout["stage 2_1"]
    assert {t for _, pats in stage.values() for t in _matches(pats, DGN_TAGS)} == {
        "value/2_1/Vx_norm", "value/2_1/clipped_frac", "coop/2_1/cross_ratio"}
    compare = layout["all players and stages"]["curvature/*/A_cond"][1]
    assert _matches(compare, DGN_TAGS + ["curvature/0/A_cond_x"]) == [
        "curvature/0/A_cond", "curvature/2.conv1/A_cond"]
    assert _matches(layout["schedule, time, communication, bandit"]["communication"][1],
                    ["comm/bytes", "time/step", "comm/allreduce/bytes"]) == [
        "comm/bytes", "comm/allreduce/bytes"]  # tags written after the layout still show


def test_layout_is_written_once_after_the_player_tags() -> None:
    written: list[dict[str, Any]] = []
    writer = DashboardWriter(written.append, enabled=True, expect_groups=True)
    writer.observe(["bandit/reward"])
    assert not written  # waits for the per-player statistics
    writer.observe(["curvature/0/A_cond"])
    writer.observe(["curvature/1/A_cond"])
    writer.write()
    assert len(written) == 1 and "player 0" in written[0] and "player 1" not in written[0]
    plain = DashboardWriter(written.append, enabled=True, expect_groups=False)  # e.g. SGD
    plain.observe([])
    assert len(written) == 2 and not any(k.startswith("player") for k in written[1])
    DashboardWriter(written.append, enabled=False, expect_groups=False).write()  # rank > 0
    assert len(written) == 2


def test_layout_shares_the_event_file_of_the_scalars(dgn_run: tuple[Path, str]) -> None:
    run_dir, _ = dgn_run
    files = list((run_dir / "tb").iterdir())
    assert len(files) == 1, files  # TensorBoard's loader reads a run's files in sequence
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


@pytest.fixture(scope="module")
def dgn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A short DGNOpt run on DIGITS with curvature statistics every 5 steps."""
    run_dir = tmp_path_factory.mktemp("run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = dgn_train(["--config", str(CONFIGS / "table2_digits.toml"), "optim.name=dgnopt",
                        "optim.lr=0.1", "run.epochs=1", "run.max_steps=20",
                        "logging.tensorboard=true", "logging.log_every=5",
                        "logging.curvature_every=5", f"run.dir={run_dir}"])
    assert rc == 0, out.getvalue()
    return run_dir, out.getvalue()


def test_dgn_train_prints_the_tensorboard_line(dgn_run: tuple[Path, str]) -> None:
    run_dir, out = dgn_run
    lines = [line for line in out.splitlines() if line.startswith("tensorboard: ")]
    assert len(lines) == 2  # at the start and after training
    assert lines[0].endswith(f"tensorboard --logdir {run_dir} --host 127.0.0.1")


def _get(port: int, path: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _logged(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_real_tensorboard_serves_the_logged_values(dgn_run: tuple[Path, str]) -> None:
    run_dir, _ = dgn_run
    logged = _logged(run_dir)
    assert {"curvature/2.conv1/A_cond", "update/4/feedback_ratio", "value/2_1/Vxx_trace",
            "loss/train"} <= set(logged)
    port = free_port()
    proc = subprocess.Popen([str(TENSORBOARD), "--logdir", str(run_dir), "--host",
                             "127.0.0.1", "--port", str(port), "--load_fast=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:  # until it answers and has read the run
            try:
                if "tb" in _get(port, "/data/runs"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tensorboard did not come up: {proc.stderr.read()!r}")
            time.sleep(0.5)
        for tag in ("loss/train", "curvature/2.conv1/A_cond", "update/4/feedback_ratio",
                    "value/2_1/Vxx_trace", "acc/test"):
            served = _get(port, "/data/plugin/scalars/scalars", run="tb", tag=tag)
            # JSON carries inf / nan as strings ("Infinity"), float() reads both forms
            assert [(step, float(value)) for _, step, value in served] == logged[tag], tag
        layout = _get(port, "/data/plugin/custom_scalars/layout")
        titles = [c["title"] for c in layout["category"]]
        assert titles[:2] == ["training", "all players and stages"]
        assert {"player 0", "player 2.conv1", "player 2.conv2", "player 4", "stage 2_1",
                "stage terminal"} <= set(titles)
        charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"]
                  for c in cat["chart"] if cat["title"] == "all players and stages"}
        served = _get(port, "/data/plugin/custom_scalars/scalars", run="tb",
                      tag=charts["curvature/*/A_cond"][0])
        assert served["regex_valid"]
        lines = served["tag_to_events"]
        assert sorted(lines) == sorted(
            t for t in logged if t.startswith("curvature/") and t.endswith("/A_cond"))
        assert len(lines) == 4  # one line per player
        for tag, events in lines.items():
            assert [(e[1], float(e[2])) for e in events] == logged[tag]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
