"""The TensorBoard curvature dashboard: a custom-scalars layout built from a run's own tags.

``tensorboard --logdir <run dir> --host 127.0.0.1`` then shows, under *Custom Scalars*:

* **training** -- ``loss/*`` and ``acc/*``;
* **all players and stages** -- one chart per statistic with one line per player / stage
  (``curvature/*/A_cond``, ``update/*/feedback_ratio``, ``value/*/Vxx_trace``, ...);
* **player <name>** -- per player (a layer of the game, eq. 16): curvature eigenvalues,
  condition numbers and damping (``curvature/<player>/...``), update norms and the
  feedback/open ratio (``update/<player>/...``);
* **stage <name>** -- per stage: the value function at the stage input (``value/<stage>/...``)
  and the cooperative cross ratio (``coop/<stage>/cross_ratio``);
* **schedule, time, communication, bandit** -- ``lr``, ``time/*``, ``comm/*``, ``bandit/*``.

Charts hold anchored regular expressions, so tags that first appear after the layout was
written (``comm/*``, ``time/*``) still show. Eigen-spectrum histograms, when the run writes
them (``curvature/<player>/{A,G}_eig``), are in TensorBoard's *Histograms* tab. Rank 0
writes the layout once per session, into the run's event file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: Namespaces whose tags are ``<ns>/<player>/<stat>``.
PLAYER_NAMESPACES = ("curvature", "update")
#: Namespaces whose tags are ``<ns>/<stage>/<stat>``.
STAGE_NAMESPACES = ("value", "coop")
#: Charts that share an axis inside a player / stage category (other statistics: one each).
FAMILIES: dict[str, str] = {
    "A_eig_max": "eigenvalues", "A_eig_min": "eigenvalues", "G_eig_max": "eigenvalues",
    "G_eig_min": "eigenvalues", "A_cond": "condition numbers", "G_cond": "condition numbers",
    "open_norm": "update norms", "feedback_norm": "update norms",
}
Layout = dict[str, dict[str, list[Any]]]


def _exact(*tags: str) -> list[str]:
    return [f"^{re.escape(tag)}$" for tag in tags]


def _grouped(tags: Iterable[str], namespaces: tuple[str, ...]) -> dict[str, list[str]]:
    """``{group: [tag, ...]}`` for the three-part tags of ``namespaces``, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for tag in tags:
        parts = tag.split("/")
        if len(parts) == 3 and parts[0] in namespaces:
            groups.setdefault(parts[1], []).append(tag)
    return groups


def _group_category(tags: list[str]) -> dict[str, list[Any]]:
    """Charts of one player / stage: statistics of a family together, the rest alone."""
    charts: dict[str, list[str]] = {}
    for tag in tags:
        ns, _, stat = tag.split("/")
        charts.setdefault(f"{ns}: {FAMILIES.get(stat, stat)}", []).append(tag)
    return {title: ["Multiline", _exact(*members)] for title, members in charts.items()}


def build_layout(tags: Iterable[str]) -> Layout:
    """The custom-scalars layout (``SummaryWriter.add_custom_scalars`` format:
    ``{category: {chart: ["Multiline", [tag regex, ...]]}}``) for a run writing ``tags``.

    Args:
        tags: the scalar tags the run writes (at least the per-player / per-stage ones, e.g.
            the keys of DGNOpt's ``curvature_stats()``), in the order to show them.
    """
    tags = list(dict.fromkeys(tags))
    layout: Layout = {"training": {
        "loss": ["Multiline", ["^loss/"]], "accuracy (%)": ["Multiline", ["^acc/"]]}}
    order = PLAYER_NAMESPACES + STAGE_NAMESPACES
    per_group = sorted((t for t in tags if len(t.split("/")) == 3 and t.split("/")[0] in order),
                       key=lambda t: order.index(t.split("/")[0]))  # stable: keeps tag order
    compare: dict[str, list[Any]] = {}
    for tag in per_group:
        ns, _, stat = tag.split("/")
        compare[f"{ns}/*/{stat}"] = ["Multiline",
                                     [f"^{re.escape(ns)}/[^/]+/{re.escape(stat)}$"]]
    if compare:
        layout["all players and stages"] = compare
    for title, namespaces in (("player", PLAYER_NAMESPACES), ("stage", STAGE_NAMESPACES)):
        groups = list(_grouped(per_group, namespaces).items())
        if title == "stage":  # DGNOpt records the value functions backward (terminal first)
            groups.reverse()
        for group, members in groups:
            layout[f"{title} {group}"] = _group_category(members)
    layout["schedule, time, communication, bandit"] = {
        "learning rate": ["Multiline", ["^lr$"]], "time (s)": ["Multiline", ["^time/"]],
        "communication": ["Multiline", ["^comm/"]],
        "bandit arm probabilities": ["Multiline", ["^bandit/.*/prob$"]],
        "bandit reward": ["Multiline", ["^bandit/reward$"]]}
    return layout


class DashboardWriter:
    """Writes the layout of :func:`build_layout` once, early in the run, through the run's
    own event writer (one event file: TensorBoard's loader reads a run's files in sequence).

    Args:
        write: writes a layout, e.g. ``MetricsWriter.custom_scalars``.
        enabled: TensorBoard on and this is rank 0.
        expect_groups: the optimizer reports per-player statistics; the layout waits for
            them (else it is written at the first :meth:`observe`).
    """

    def __init__(self, write: Callable[[Layout], None], enabled: bool,
                 expect_groups: bool) -> None:
        self._write = write
        self.enabled = enabled
        self.expect_groups = expect_groups
        self.tags: dict[str, None] = {}
        self.written = False

    def observe(self, tags: Iterable[str]) -> None:
        """Note tags being written; write the layout when the per-player ones are known."""
        if self.written or not self.enabled:
            return
        self.tags.update(dict.fromkeys(tags))
        has_groups = any(t.split("/")[0] in PLAYER_NAMESPACES + STAGE_NAMESPACES
                         for t in self.tags)
        if has_groups or not self.expect_groups:
            self.write()

    def write(self) -> None:
        """Write the layout now (no-op once written or when disabled)."""
        if self.written or not self.enabled:
            return
        self._write(build_layout(self.tags))
        self.written = True


def tensorboard_command(run_dir: str | Path) -> str:
    """The command that serves the dashboard of ``run_dir`` on this machine only."""
    import shlex
    import shutil
    import sys

    local = Path(sys.executable).parent / "tensorboard"
    exe = str(local) if local.is_file() else (shutil.which("tensorboard") or "tensorboard")
    return f"{shlex.quote(exe)} --logdir {shlex.quote(str(run_dir))} --host 127.0.0.1"
