"""A throwaway single-node SLURM cluster on loopback, for tests that submit real batch jobs.

Usage::

    ensure_slurm()                       # raises SlurmUnavailable(reason) when it cannot be had
    with LocalSlurmCluster(tmp_dir) as cluster:
        job = cluster.submit("slurm/x.sbatch", ["a=1"], cwd=repo, env={...})
        result = cluster.wait(job, timeout_s=300)

What it does (facts of issue 6, checked on Debian 12 / slurm-wlm 22.05):

* ``slurm-wlm munge`` come from Debian with ``--no-install-recommends`` (``bootstrap.sh --test``
  installs them; :func:`ensure_slurm` tries the same when they are missing and it runs as
  root). Nothing is ever removed (other packages depend on ``libhwloc15``).
* ``munged`` runs as the ``munge`` user with ``/run/munge`` made by ``install -d -o munge -g
  munge``; a munged that already answers on the default socket is used and left running.
* ``slurm.conf`` in the cluster folder: ``SlurmctldHost=<hostname -s>(127.0.0.1)``, loopback
  only (``CommunicationParameters=NoCtldInAddrAny,NoInAddrAny``), munge auth, linuxproc
  process tracking, no task plugin, ``select/cons_tres``, ``batch_sched_delay=0``,
  ``MinJobAge=300`` (finished jobs stay visible to ``scontrol show job``: there is no
  accounting database, hence no ``sacct``), the node line of ``slurmd -C``, free ports, and
  every state/spool/log/pid path inside the folder. Several clusters can run side by side.
  The partition allows ``sbatch --oversubscribe --mem=...`` jobs to share the CPUs.
* ``slurmctld -D`` and ``slurmd -D`` run in their own sessions (``setsid``); the cluster is
  ready when ``scontrol ping`` says UP and the node is IDLE.
* :meth:`LocalSlurmCluster.stop` cancels the cluster's jobs, waits for them to end, then
  stops only the daemons this object started, by pid.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")
MUNGE_BINARIES = ("munged", "munge")
DEBIAN_PACKAGES = ("slurm-wlm", "munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")
# Job states after which a job never runs again (squeue/scontrol names).
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT", "REVOKED"})


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (tests skip on it)."""


@dataclass(frozen=True)
class JobResult:
    """A finished batch job as ``scontrol show job`` reports it.

    Attributes:
        job_id: the SLURM job id.
        state: final ``JobState`` (``COMPLETED``, ``FAILED``, ...).
        exit_code: ``ExitCode`` as ``"status:signal"`` (``"0:0"`` on success).
        stdout: the job's output file (``StdOut``).
        wait_s: seconds from the call of :meth:`LocalSlurmCluster.wait` to the final state.
        fields: every ``key=value`` field of ``scontrol show job -o``.
    """

    job_id: str
    state: str
    exit_code: str
    stdout: Path
    wait_s: float
    fields: dict[str, str]

    @property
    def ok(self) -> bool:
        """True when the job completed with exit code 0."""
        return self.state == "COMPLETED" and self.exit_code == "0:0"

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the job's output file (for assertion messages)."""
        try:
            return self.stdout.read_text(errors="replace")[-chars:]
        except OSError as err:
            return f"<cannot read {self.stdout}: {err}>"


def _run(cmd: Sequence[str], timeout_s: float = 30.0, env: Mapping[str, str] | None = None,
         cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s,
                          env=None if env is None else dict(env), cwd=cwd, check=False)


def _missing() -> list[str]:
    return [b for b in (*SLURM_BINARIES, *MUNGE_BINARIES)
            if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_slurm(install: bool = True) -> None:
    """Make sure the SLURM and munge programs are present.

    Args:
        install: when programs are missing, install ``slurm-wlm munge`` with apt-get
            (``--no-install-recommends``; root only).

    Raises:
        SlurmUnavailable: programs are missing and cannot be installed (not root, no
            apt-get, or apt-get failed); the message carries the reason.
    """
    missing = _missing()
    if not missing:
        return
    what = f"missing {', '.join(missing)}"
    if not install:
        raise SlurmUnavailable(f"{what}; install them: apt-get install --no-install-recommends "
                               f"{' '.join(DEBIAN_PACKAGES)} (or run ./bootstrap.sh --test)")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{what}; installing {' '.join(DEBIAN_PACKAGES)} needs root and "
                               f"apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBIAN_PACKAGES]
    out = _run(install_cmd, 600, env)
    if out.returncode != 0:  # stale package lists: update once and retry
        _run(["apt-get", "update", "-qq"], 600, env)
        out = _run(install_cmd, 600, env)
    if out.returncode != 0 or _missing():
        raise SlurmUnavailable(f"{what}; apt-get install {' '.join(DEBIAN_PACKAGES)} failed "
                               f"(exit {out.returncode}): {(out.stderr or out.stdout)[-500:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_pid(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM one process we started, SIGKILL it if it is still there after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


def _parse_fields(line: str) -> dict[str, str]:
    """``key=value`` fields of one ``scontrol show ... -o`` line."""
    return {m.group(1): m.group(2) for m in re.finditer(r"(\S+?)=(\S*)", line)}


class LocalSlurmCluster:
    """One slurmctld and one slurmd on 127.0.0.1, configured inside ``root``.

    Args:
        root: an empty or new folder for slurm.conf, state, spool, logs and pid files.
        cluster_name: SLURM's ClusterName.
    """

    def __init__(self, root: str | Path, cluster_name: str = "dgntest") -> None:
        self.root = Path(root).resolve()
        self.cluster_name = cluster_name
        self.conf = self.root / "slurm.conf"
        self.hostname = socket.gethostname().split(".")[0]
        self.ctld_port = self.slurmd_port = 0
        self.started_s = 0.0  # seconds start() took (cold start to ready)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    # --- environment ------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``SLURM_CONF`` pointing at this cluster (for every client)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _client(self, *cmd: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        return _run(cmd, timeout_s, self.env)

    def log_tail(self, chars: int = 1500) -> str:
        """The ends of the daemons' output (for error messages); ``-D`` copies their log files
        to it, and it also has what they print before their log file is open."""
        parts = []
        for path in sorted((self.root / "log").glob("*.out")):
            text = path.read_text(errors="replace")[-chars:]
            parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    # --- start --------------------------------------------------------------------------
    def _write_conf(self) -> None:
        probe = _run(["slurmd", "-C"], 30)
        node = next((ln for ln in probe.stdout.splitlines() if ln.startswith("NodeName=")), None)
        if probe.returncode != 0 or node is None:
            raise SlurmUnavailable(f"`slurmd -C` printed no node line (exit {probe.returncode}): "
                                   f"{probe.stderr.strip()[-500:]}")
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SchedulerParameters=batch_sched_delay=0",
            "MinJobAge=300",
            "KillWait=5",  # scancel: SIGKILL 5 s after SIGTERM (quick teardown)
            "ReturnToService=2",
            "MpiDefault=none",
            "MailProg=/bin/true",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
            # OverSubscribe=YES: jobs submitted with --oversubscribe (and --mem) may share CPUs.
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=YES",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: Sequence[str], user: str | None = None) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # closed in stop()
        self._logs.append(log)
        self._procs[name] = subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=self.env, start_new_session=True,  # setsid: no signals from our terminal
            user=user, group=user)

    def _munge_answers(self) -> bool:
        try:
            enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return enc.returncode == 0

    def _start_munge(self) -> None:
        if self._munge_answers():
            return  # a munged is already serving the default socket: use it, leave it be
        if os.geteuid() != 0:
            raise SlurmUnavailable("munged is not running and starting it needs root")
        made = _run(["install", "-d", "-o", "munge", "-g", "munge", str(MUNGE_SOCKET_DIR)])
        if made.returncode != 0:
            raise SlurmUnavailable(f"cannot create {MUNGE_SOCKET_DIR} for munged: "
                                   f"{made.stderr.strip()}")
        if not MUNGE_KEY.exists():
            _run(["runuser", "-u", "munge", "--", "mungekey", "--create"], 30)
        munged = shutil.which("munged") or "/usr/sbin/munged"
        # As `runuser -u munge -- munged`, in the foreground so that its pid is ours to stop.
        self._spawn("munged", [munged, "--foreground"], user="munge")
        deadline = time.monotonic() + 10
        while not self._munge_answers():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start munged (when none runs), slurmctld and slurmd; return once the node is IDLE.

        Raises:
            SlurmUnavailable: a daemon exited or the node was not IDLE within ``timeout_s``
                (the message has the daemons' log tails); what was started is stopped.
        """
        t0 = time.perf_counter()
        try:
            self._write_conf()
            self._start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.perf_counter() - t0

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        node_line = ""
        while time.monotonic() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{', '.join(dead)} exited during start-up:\n"
                                       f"{self.log_tail()}")
            ping = self._client("scontrol", "ping")
            if "is UP" in ping.stdout:
                node_line = self._client("scontrol", "show", "node", "-o", self.hostname).stdout
                if re.search(r"\bState=IDLE\s", node_line):
                    return
            time.sleep(0.1)
        raise SlurmUnavailable(f"the node was not IDLE within {timeout_s:.0f} s (node: "
                               f"{node_line.strip()[:400] or 'no answer'}):\n{self.log_tail()}")

    # --- jobs ---------------------------------------------------------------------------
    def submit(self, script: str | Path, args: Sequence[str] = (), *, cwd: str | Path,
               env: Mapping[str, str] | None = None, options: Sequence[str] = ()) -> str:
        """``sbatch --parsable [options] script args`` from ``cwd``; returns the job id.

        Args:
            script: the batch script.
            args: arguments passed to the script.
            cwd: the submit directory (``SLURM_SUBMIT_DIR``; the job starts there).
            env: extra variables for the job (sbatch passes its environment on).
            options: sbatch options, e.g. ``["--cpus-per-task=2", "--output=/tmp/j-%j.out"]``.

        Raises:
            RuntimeError: sbatch refused the job (with its message).
        """
        out = _run(["sbatch", "--parsable", *options, str(script), *args], 30,
                   {**self.env, **(env or {})}, cwd)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed (exit {out.returncode}): {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job_fields(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` of one job as a dict (empty when unknown)."""
        out = self._client("scontrol", "show", "job", "-o", job_id)
        return _parse_fields(out.stdout) if out.returncode == 0 else {}

    def wait(self, job_id: str, timeout_s: float = 300.0, poll_s: float = 0.25) -> JobResult:
        """Poll ``scontrol show job`` until the job reaches a final state.

        Raises:
            TimeoutError: still not finished after ``timeout_s`` (the job is cancelled; the
                message has its state and the end of its output).
        """
        t0 = time.perf_counter()
        fields: dict[str, str] = {}
        while time.perf_counter() - t0 < timeout_s:
            fields = self.job_fields(job_id)
            state = fields.get("JobState", "")
            if state in FINAL_STATES:
                return JobResult(job_id, state, fields.get("ExitCode", ""),
                                 Path(fields.get("StdOut", "")), time.perf_counter() - t0, fields)
            time.sleep(poll_s)
        self._client("scancel", job_id)
        out = Path(fields.get("StdOut", "/nonexistent"))
        tail = out.read_text(errors="replace")[-3000:] if out.is_file() else "<no output>"
        raise TimeoutError(f"job {job_id} still {fields.get('JobState', '?')} after "
                           f"{timeout_s:.0f} s (cancelled); output:\n{tail}")

    def active_jobs(self) -> list[str]:
        """Ids of the cluster's jobs that are pending, running or completing."""
        out = self._client("squeue", "-h", "-o", "%i %T")
        if out.returncode != 0:
            return []
        return [ln.split()[0] for ln in out.stdout.splitlines()
                if ln.split() and ln.split()[-1] not in FINAL_STATES]

    def cancel_all(self, timeout_s: float = 30.0) -> None:
        """``scancel`` every active job and wait until none is left (or ``timeout_s``)."""
        jobs = self.active_jobs()
        if not jobs:
            return
        self._client("scancel", *jobs)
        deadline = time.monotonic() + timeout_s
        while self.active_jobs() and time.monotonic() < deadline:
            time.sleep(0.2)

    # --- stop ---------------------------------------------------------------------------
    @property
    def pids(self) -> dict[str, int]:
        """Pids of the daemons this object started (munged only when it started it)."""
        return {name: proc.pid for name, proc in self._procs.items()}

    def stop(self) -> None:
        """Cancel the jobs, then stop slurmd, slurmctld and our munged by pid; idempotent."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                _stop_pid(proc)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> LocalSlurmCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
