"""slurm/ batch scripts: shellcheck, the launch lines they compose, and real jobs on a local
single-node SLURM cluster (tests/slurm_cluster.py) that train on DIGITS with 2 CPU processes.

The cluster tests skip, with the reason, only where SLURM cannot be installed or started.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurmCluster, SlurmUnavailable, ensure_slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "slurm").iterdir()
                 if p.suffix in (".sbatch", ".sh"))
TRAIN = ["run.epochs=1", "logging.tensorboard=false", "run.quiet=true"]


def _script_env(**extra: str) -> dict[str, str]:
    """The submitting environment: no SLURM job variables of an enclosing job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, **extra}


# --- static checks (no SLURM needed) -----------------------------------------------------
def test_scripts_are_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck, or "
                    "./bootstrap.sh --test as root)")
    assert {"slurm/env.sh", "slurm/node_launch.sh", "slurm/torchrun_single_node.sbatch",
            "slurm/torchrun_multi_node.sbatch", "slurm/accelerate.sbatch",
            "slurm/deepspeed.sbatch"} <= set(SCRIPTS)
    out = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    for script in SCRIPTS:
        if script.endswith(".sbatch") or script.endswith("node_launch.sh"):
            assert "set -euo pipefail" in (REPO / script).read_text(), script


def _dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False,
                          env=_script_env(DRY_RUN="1", **env))


def _launch_line(out: subprocess.CompletedProcess[str]) -> list[str]:
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[slurm] + ")]
    assert len(lines) == 1, out.stdout
    return lines[0].removeprefix("[slurm] + ").split()


def test_single_node_launch_line_cpu(tmp_path: Path) -> None:
    out = _dry_run("slurm/torchrun_single_node.sbatch", "optim.lr=0.05", DEVICE="cpu",
                   NPROC_PER_NODE="3", CONFIG="configs/digits_sgd.toml",
                   RUN_DIR=str(tmp_path / "r"))
    line = _launch_line(out)
    assert line[:7] == ["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "3",
                        "-m"]
    # config, run dir and CPU device first; the script's arguments last (they win).
    assert line[7:] == ["dgn_dist.train", "--config", "configs/digits_sgd.toml",
                        f"run.dir={tmp_path / 'r'}", "run.device=cpu", "optim.lr=0.05"]
    assert "3 process(es) per node, DEVICE=cpu" in out.stdout
    assert "GLIBC_TUNABLES=glibc.malloc.tcache_count=0" in out.stdout  # run.cpu_allocator
    kept = _dry_run("slurm/torchrun_single_node.sbatch", DEVICE="cpu",
                    GLIBC_TUNABLES="glibc.malloc.mxfast=0", RUN_DIR=str(tmp_path / "r"))
    assert "GLIBC_TUNABLES=glibc.malloc.mxfast=0:glibc.malloc.tcache_count=0" in kept.stdout


def test_multi_node_launch_line_uses_c10d_on_the_head_node() -> None:
    line = _launch_line(_dry_run("slurm/torchrun_multi_node.sbatch", DEVICE="cuda",
                                 NPROC_PER_NODE="8", MASTER_PORT="29999",
                                 SLURM_JOB_ID="77", SLURM_NNODES="1"))
    head = subprocess.run(["hostname", "-s"], capture_output=True, text=True,
                          check=True).stdout.strip()
    joined = " ".join(line)
    assert joined.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 torchrun ")
    for part in ("--nnodes 1", "--nproc_per_node 8", "--rdzv_id 77", "--rdzv_backend c10d",
                 f"--rdzv_endpoint {head}:29999", "run.device=cuda"):
        assert part in joined, (part, joined)


@pytest.mark.parametrize(("launcher", "needles"), [
    ("accelerate", ["accelerate launch --multi_gpu --num_machines 2 --machine_rank 1 "
                    "--num_processes 8 --main_process_ip head0 --main_process_port 29511 "
                    "--mixed_precision bf16 --dynamo_backend no -m dgn_dist.train --config c"]),
    ("deepspeed", ["deepspeed --hostfile {hostfile} --no_ssh --node_rank 1 --master_addr head0 "
                   "--master_port 29511 {repo}/launch/train.py --config c"]),
], ids=["accelerate", "deepspeed"])
def test_per_node_launch_lines(launcher: str, needles: list[str], tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("head0 slots=4\nnode1 slots=4\n")
    out = subprocess.run(
        ["slurm/node_launch.sh", launcher, "--config", "c"], cwd=REPO, capture_output=True,
        text=True, timeout=30, check=False,
        env=_script_env(DRY_RUN="1", HEAD_NODE="head0", NNODES="2", NPROC_PER_NODE="4",
                        MASTER_PORT="29511", MIXED_PRECISION="bf16", SLURM_NODEID="1",
                        DS_HOSTFILE=str(hostfile)))
    assert out.returncode == 0, out.stdout + out.stderr
    for needle in needles:
        assert needle.format(hostfile=hostfile, repo=REPO) in out.stdout, out.stdout


@pytest.mark.parametrize(("env", "needle"), [
    ({"DEVICE": "gpu"}, "DEVICE must be auto, cpu or cuda, got 'gpu'"),
    ({"CONFIG": "configs/nope.toml"}, "CONFIG=configs/nope.toml does not exist"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE must be a positive integer, got 'two'"),
    ({"VENV": "/nonexistent-venv"}, "VENV=/nonexistent-venv has no bin/python"),
    ({"REPO": "/"}, "no slurm/env.sh under REPO=/"),
], ids=["device", "config", "nproc", "venv", "repo"])
def test_bad_settings_exit_2_with_a_message(env: dict[str, str], needle: str) -> None:
    out = _dry_run("slurm/torchrun_single_node.sbatch", **env)
    assert out.returncode == 2, out
    assert needle in out.stderr, out.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the local cluster -------------------------------------------------------------------
def _cluster_or_skip(root: Path) -> LocalSlurmCluster:
    try:
        ensure_slurm()
        cluster = LocalSlurmCluster(root)
        cluster.start()
    except SlurmUnavailable as err:
        print(f"SLURM unavailable: {err}")
        pytest.skip(f"SLURM unavailable: {err}")
    return cluster


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_cluster_up_and_down_cancels_jobs_and_stops_its_daemons(tmp_path: Path) -> None:
    cluster = _cluster_or_skip(tmp_path / "cluster")
    try:
        pids = cluster.pids
        assert {"slurmctld", "slurmd"} <= set(pids) and all(map(_alive, pids.values()))
        marker = tmp_path / "started"
        script = tmp_path / "sleep.sh"
        script.write_text(f"#!/bin/bash\necho $$ > {marker}\nexec sleep 300\n")
        job = cluster.submit(script, cwd=tmp_path, options=[f"--output={tmp_path}/j-%j.out"])
        for _ in range(200):  # wait until the job's process runs
            if marker.exists() and marker.read_text().strip():
                break
            time.sleep(0.1)
        sleeper = int(marker.read_text())
        assert _alive(sleeper)
        assert cluster.active_jobs() == [job]
    finally:
        cluster.stop()
    assert not _alive(sleeper), "stop() left the job's process running"
    assert not any(map(_alive, pids.values())), pids
    assert cluster.pids == {}
    assert "CANCELLED" in (tmp_path / f"j-{job}.out").read_text()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurmCluster]:
    c = _cluster_or_skip(tmp_path_factory.mktemp("slurm") / "cluster")
    print(f"local SLURM cluster ready in {c.started_s:.1f} s")
    try:
        yield c
    finally:
        c.stop()


def _submit(cluster: LocalSlurmCluster, tmp_path: Path, script: str, *extra: str,
            options: tuple[str, ...] = (), **env: str) -> str:
    """Submit ``script`` with a 2-process CPU DIGITS run into ``tmp_path/run``."""
    return cluster.submit(
        script, [*TRAIN, *extra], cwd=REPO,
        env={"DEVICE": "cpu", "NPROC_PER_NODE": "2", "CONFIG": "configs/digits_sgd.toml",
             "RUN_DIR": str(tmp_path / "run"), **env},
        options=["--nodes=1", "--cpus-per-task=2", "--job-name=dgn-test",
                 f"--output={tmp_path}/job-%j.out", *options])


def _check_job(cluster: LocalSlurmCluster, job: str, tmp_path: Path, script: str,
               launcher: str) -> tuple[dict, str]:
    """Wait for ``job``; check its state, ``summary.json`` and log; return both."""
    run_dir = tmp_path / "run"
    result = cluster.wait(job, timeout_s=280)
    log = result.log_tail(20000)
    times = " ".join(f"{k}={result.fields.get(k)}" for k in ("SubmitTime", "StartTime", "EndTime"))
    print(f"{script}: job {job} {result.state} after {result.wait_s:.1f} s ({times})")
    assert result.ok, f"{script}: job {job} {result.state} {result.exit_code}:\n{log}"
    assert result.stdout == tmp_path / f"job-{job}.out"
    summary = json.loads((run_dir / "summary.json").read_text())
    # Both processes joined one group and shared the data (dp = 2), under the right launcher.
    assert (summary["world_size"], summary["dp"], summary["launcher"]) == (2, 2, launcher), \
        (script, {k: summary.get(k) for k in ("world_size", "dp", "launcher")})
    assert summary["dataset"] == "digits" and summary["device"] == "cpu"
    assert f"[slurm] job {job} on 1 node(s)" in log
    assert "[slurm] exit status 0 after" in log
    done = [ln for ln in log.splitlines() if ln.startswith("done: test acc")]
    assert len(done) == 1, f"rank 0 alone reports the result:\n{log}"  # not one per process
    assert f"run dir {run_dir}" in done[0]
    assert f"{summary['test_acc']:.2f}%" in done[0]
    return summary, log


def test_single_node_torchrun_job_trains_digits_on_two_processes(
        cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    script = "slurm/torchrun_single_node.sbatch"
    job = _submit(cluster, tmp_path, script)
    summary, log = _check_job(cluster, job, tmp_path, script, "torchrun")
    assert "[slurm] + torchrun --standalone --nnodes 1 --nproc_per_node 2" in log
    assert summary["epochs"] == 1.0 and summary["steps"] > 100
    assert [rec["epoch"] for rec in summary["history"]] == [1]
    assert summary["test_acc"] > 80.0, summary["test_acc"]  # ~96% after one epoch


def test_a_failing_job_is_reported_failed_with_its_error(cluster: LocalSlurmCluster,
                                                         tmp_path: Path) -> None:
    job = _submit(cluster, tmp_path, "slurm/torchrun_single_node.sbatch", DEVICE="gpu")
    result = cluster.wait(job, timeout_s=60)
    assert (result.state, result.exit_code, result.ok) == ("FAILED", "2:0", False)
    assert "[slurm] error: DEVICE must be auto, cpu or cuda, got 'gpu'" in result.log_tail()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_srun_launcher_jobs(cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    """srun torchrun (c10d), accelerate and deepspeed scripts on one node, submitted together
    (--oversubscribe: they share the CPUs, ~50 s instead of ~85 s one after the other)."""
    launches = {"slurm/torchrun_multi_node.sbatch": "torchrun",
                "slurm/accelerate.sbatch": "accelerate", "slurm/deepspeed.sbatch": "deepspeed"}
    jobs = {}
    for script in launches:
        folder = tmp_path / Path(script).stem
        folder.mkdir()
        port = str(_free_port())
        jobs[script] = (folder, port, _submit(
            cluster, folder, script, "run.max_steps=20", MASTER_PORT=port,
            options=("--oversubscribe", "--mem=2G")))
    for script, (folder, port, job) in jobs.items():
        summary, log = _check_job(cluster, job, folder, script, launches[script])
        assert summary["steps"] == 20
        assert "[slurm] + srun --kill-on-bad-exit=1 --ntasks-per-node=1 " in log
        assert f":{port} " in log or f"_port {port} " in log, log  # the rendezvous port
