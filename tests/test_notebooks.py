"""The dashboards run top to bottom, headless, against real studies, and draw labelled figures."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from sbn_study.results.analysis import trials
from sbn_study.spec.config import DOMAINS
from sbn_study.trial.featstats import LOGIT_NORM, MECHANISM_STATS
from tests.conftest import FinishedStudy, run_small_study
from tests.test_robustness_e2e import Trained, train_quickstart

pytestmark = pytest.mark.slow

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
# Notebook → the figures it draws.
FIGURES = {"study_overview": 3, "feature_maps": 5, "placement": 2}

# A second small study, for what the shared ASHA one does not promise: it searches norm.kind, so that the 2bn
# control is among the arms, and it has no scheduler, so that every trial completes (the importance figure
# needs two completed trials). All its trials come from the seeded random start-up sampler, so the arms do
# not depend on trial timing: seed 24 draws 2bn23, sbn23, 2bn-all and bn (in the quick-start's space).
CONTROL_STUDY_OVERRIDES = [
    "name=e2e-control",
    "search.num_samples=4",
    "search.sampler.seed=24",
    "search.sampler.n_startup_trials=4",
    "search.scheduler.type=none",
    "train.epochs=2",
    "search.space.norm.kind={choice: [sbn, 2bn]}",
]

# The metrics of feature_maps' mechanism panel, as an SQL condition on MLflow's metric tables.
MECHANISM_KEYS = " OR ".join(
    [*(f"key LIKE 'fm/%/{stat}'" for stat in MECHANISM_STATS), f"key = '{LOGIT_NORM}'"]
)
MECHANISM_TITLES = ("SBN scale s per site", "additive share per site", "logit norm")

# Injected as the first cell: keeps every figure the notebook makes (plt.subplots goes through plt.figure),
# because the inline backend closes a figure once it is shown and the last cell describes them all.
KEEP_FIGURES = """\
import matplotlib.pyplot as _plt

_made_figures = []
_new_figure = _plt.figure


def _kept_figure(*args, **kwargs):
    figure = _new_figure(*args, **kwargs)
    _made_figures.append(figure)
    return figure


_plt.figure = _kept_figure
"""
AXES_MARKER = "axes of the notebook's figures: "
# Injected as the last cell: every axes of those figures, as JSON on one line after AXES_MARKER.
DESCRIBE_AXES = f"""\
import json as _json

from matplotlib.container import BarContainer as _BarContainer


def _label(ax, which):
    # A shared axis (sharey=True) is labelled once for its row or column: a sibling's label counts.
    siblings = getattr(ax, f"get_shared_{{which}}_axes")().get_siblings(ax)
    return next((text for text in (getattr(a, f"get_{{which}}label")() for a in [ax, *siblings]) if text), "")


_described = []
for _number, _figure in enumerate(dict.fromkeys(_made_figures), start=1):
    for _ax in _figure.axes:
        _colorbar = getattr(_ax, "_colorbar", None)
        _described.append(
            {{
                "figure": f"figure {{_number}} {{_figure.get_suptitle()!r}}",
                "title": _ax.get_title(),
                "shown": _ax.get_visible() and _ax.axison,
                "colorbar": None if _colorbar is None else _colorbar.orientation,
                "xlabel": _label(_ax, "x"),
                "ylabel": _label(_ax, "y"),
                "bars": sum(len(c) for c in _ax.containers if isinstance(c, _BarContainer)),
                "xticks": [t.get_text() for t in _ax.get_xticklabels()],
                "yticks": [t.get_text() for t in _ax.get_yticklabels()],
                "texts": [t.get_text() for t in _ax.texts],
            }}
        )
print({AXES_MARKER!r} + _json.dumps(_described))
"""


@dataclass(frozen=True)
class Dashboard:
    outputs: list[Any]  # the outputs of the notebook's own cells
    axes: list[dict[str, Any]]  # every axes of every figure, as DESCRIBE_AXES writes them

    def axes_titled(self, words: str) -> dict[str, Any]:
        found = [ax for ax in self.axes if words in ax["title"]]
        assert len(found) == 1, f"expected one axes titled '…{words}…', got {[a['title'] for a in self.axes]}"
        return found[0]


def unlabelled(axes: list[dict[str, Any]]) -> list[str]:
    """The visible axes that lack an x or a y label (a colorbar needs one along its length only)."""
    needed = {"vertical": ("ylabel",), "horizontal": ("xlabel",), None: ("xlabel", "ylabel")}
    return [
        f"{ax['figure']}, {'colorbar' if ax['colorbar'] else 'axes'} {ax['title']!r}: no {' and no '.join(lacking)}"
        for ax in axes
        if ax["shown"] and (lacking := [label for label in needed[ax["colorbar"]] if not ax[label].strip()])
    ]


def run_dashboard(name: str, study: FinishedStudy, monkeypatch: pytest.MonkeyPatch) -> Dashboard:
    """Runs a dashboard against `study`, checks what every run must show, and returns what it drew."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(DASHBOARDS / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    assert any("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells)
    notebook.cells = [
        nbformat.v4.new_code_cell(KEEP_FIGURES),
        *notebook.cells,
        nbformat.v4.new_code_cell(DESCRIBE_AXES),
    ]
    # The kernel inherits this environment: it is how the dashboards are pointed at a store and a study.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study.tracking_uri)
    monkeypatch.setenv("SBN_STUDY", study.spec.name)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(DASHBOARDS)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [output for cell in notebook.cells[1:-1] for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(f"study '{study.spec.name}' in {study.tracking_uri}" in o.get("text", "") for o in outputs)
    (report,) = [o.text for o in notebook.cells[-1].outputs if AXES_MARKER in o.get("text", "")]
    axes = json.loads(report.split(AXES_MARKER, 1)[1])
    assert not unlabelled(axes), "\n".join(unlabelled(axes))
    return Dashboard(outputs, axes)


@pytest.fixture(scope="module")
def control_study(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> FinishedStudy:
    """A finished 4-trial study without a scheduler whose arms include the 2bn control (see above)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        return run_small_study(tmp_path_factory.mktemp("control-study"), CONTROL_STUDY_OVERRIDES)


@pytest.fixture(scope="module")
def small_dashboard(small_study: FinishedStudy) -> Callable[[str], Dashboard]:
    """A dashboard run against the shared small (ASHA) study, once per module: several tests read each."""
    ran: dict[str, Dashboard] = {}

    def dashboard(name: str) -> Dashboard:
        if name not in ran:
            with pytest.MonkeyPatch.context() as patch:
                ran[name] = run_dashboard(name, small_study, patch)
        return ran[name]

    return dashboard


def sampled_by(table: pd.DataFrame) -> dict[str, int]:
    """Searched parameter → how many trials of a `trials` table sampled it (all, unless it is conditional)."""
    return {key: sum(key in row.split(",") for row in table.searched) for key in table.attrs["searched"]}


def mechanism_recorded(study: FinishedStudy) -> bool:
    with closing(sqlite3.connect(study.output / "mlflow.db")) as db:
        return db.execute(f"SELECT COUNT(*) FROM latest_metrics WHERE {MECHANISM_KEYS}").fetchone()[0] > 0


def without_mechanism(study: FinishedStudy, folder: Path) -> FinishedStudy:
    """A copy of `study`'s store without the mechanism metrics, as a study run before they were recorded."""
    shutil.copy(study.output / "mlflow.db", folder / "mlflow.db")
    with closing(sqlite3.connect(folder / "mlflow.db")) as db:
        for table in ("metrics", "latest_metrics"):
            db.execute(f"DELETE FROM {table} WHERE {MECHANISM_KEYS}")
        db.commit()
    return dataclasses.replace(study, output=folder, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_and_draws_its_figures_with_labelled_axes(
    name: str, small_dashboard: Callable[[str], Dashboard]
) -> None:
    dashboard = small_dashboard(name)
    figures = [o for o in dashboard.outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= FIGURES[name]
    assert len({ax["figure"] for ax in dashboard.axes}) >= FIGURES[name]


def test_overview_rates_parameters_at_each_rung_and_shows_ashas_fidelity(
    small_study: FinishedStudy, small_dashboard: Callable[[str], Dashboard]
) -> None:
    dashboard = small_dashboard("study_overview")
    table = trials(small_study.tracking_uri, small_study.spec.name)
    measured = table.status.isin(["completed", "stopped_early"]).sum()
    completed = (table.status == "completed").sum()
    searched = list(small_study.spec.search.space)
    # ASHA with grace period 1 and a budget of 3 epochs: one rung, at epoch 1, which every trial reached.
    at_rung = dashboard.axes_titled("parameter importance at epoch 1 (rung)")
    assert at_rung["title"] == f"e2e-small: parameter importance at epoch 1 (rung) over {measured} trials"
    assert at_rung["shown"] and at_rung["bars"] == len(searched)
    assert sorted(at_rung["yticks"]) == sorted(f"{key} (n={n})" for key, n in sampled_by(table).items())
    at_end = dashboard.axes_titled("parameter importance at epoch 3 (full budget)")
    assert at_end["title"].endswith(f"over {completed} trials") and at_end["shown"] == (completed >= 2)
    fidelity = dashboard.axes_titled("rung 1 → epoch 3: Spearman ρ")
    assert fidelity["shown"] and fidelity["title"].endswith(f"(n = {completed})")


def test_overview_ranks_the_importance_of_every_searched_parameter(
    control_study: FinishedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    dashboard = run_dashboard("study_overview", control_study, monkeypatch)
    importance = dashboard.axes_titled("parameter importance")
    searched = list(control_study.spec.search.space)
    # No scheduler: the full budget is the only epoch compared, and every trial reached it. One bar per searched
    # parameter (a conditional one rests on the trials that sampled it), not the "too few to rate" fallback (a
    # hidden axes with a text).
    assert importance["title"] == "e2e-control: parameter importance at epoch 2 (full budget) over 4 trials"
    assert importance["shown"] and importance["bars"] == len(searched), importance
    table = trials(control_study.tracking_uri, control_study.spec.name)
    assert sorted(importance["yticks"]) == sorted(f"{key} (n={n})" for key, n in sampled_by(table).items())
    assert not importance["texts"]
    assert any("no rungs: scheduler 'none' compared" in o.get("text", "") for o in dashboard.outputs)


def test_feature_maps_show_the_mechanism_or_say_the_study_has_none(
    small_study: FinishedStudy,
    small_dashboard: Callable[[str], Dashboard],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    note = "no mechanism metrics in this study"
    earlier = run_dashboard("feature_maps", without_mechanism(small_study, tmp_path), monkeypatch)
    for dashboard, recorded in [
        (small_dashboard("feature_maps"), mechanism_recorded(small_study)),
        (earlier, False),
    ]:
        drawn = [ax for ax in dashboard.axes if ax["title"].endswith(MECHANISM_TITLES)]
        assert len(drawn) == (len(MECHANISM_TITLES) if recorded else 0)
        assert all(ax["shown"] for ax in drawn)
        assert any(note in o.get("text", "") for o in dashboard.outputs) == (not recorded)


def test_placement_shows_sbn_against_its_2bn_control_and_plain_bn(
    control_study: FinishedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    dashboard = run_dashboard("placement", control_study, monkeypatch)
    by_placement = dashboard.axes_titled("validation accuracy by placement")
    # Tick labels read "<arm>\n(n=<compared trials>)"; every trial completed, so each arm has one.
    arms = dict(tick.split("\n") for tick in by_placement["xticks"])
    assert arms == {"bn": "(n=1)", "sbn23": "(n=1)", "2bn23": "(n=1)", "2bn-all": "(n=1)"}


def test_domains_compares_the_methods_per_target_and_shows_bnes_embeddings(
    domain_study: FinishedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    dashboard = run_dashboard("domains", domain_study, monkeypatch)
    table = trials(domain_study.tracking_uri, domain_study.spec.name, all_params=True)
    targets = list(DOMAINS["synthetic_domains"])
    by_method = dashboard.axes_titled("target accuracy by method")
    # One bar per held-out domain and one for their mean, for each method the study tried.
    assert by_method["xticks"] == [*targets, "mean"]
    assert by_method["bars"] == 5 * table["data.dg_method"].nunique()
    assert dashboard.axes_titled("source validation against target")["shown"]
    completed_bne = ((table["data.dg_method"] == "bne") & (table.status == "completed")).any()
    heatmaps = [ax for ax in dashboard.axes if ax["title"].endswith("W2 distances")]
    assert [ax["title"] for ax in heatmaps] == (
        [f"target {t}: W2 distances" for t in targets] if completed_bne else []
    )
    assert any("no compared BNE trial" in o.get("text", "") for o in dashboard.outputs) == (not completed_bne)


@pytest.fixture(scope="module")
def final_training(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return train_quickstart(tmp_path_factory.mktemp("final-training"))


def test_robustness_draws_heat_maps_filters_corruption_curves_and_reliability_per_arm(
    final_training: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sbn_study.evaluate.corruptions import CORRUPTIONS

    # A final training reads as its study's: the dashboard takes SBN_STUDY and opens "<study>-final".
    source = SimpleNamespace(tracking_uri=final_training.uri, spec=SimpleNamespace(name="quickstart"))
    dashboard = run_dashboard("robustness", source, monkeypatch)  # type: ignore[arg-type]
    titles = [ax["title"] for ax in dashboard.axes if ax["shown"]]
    # One heat map and one reliability diagram per arm, each over the arm's two seeds.
    assert [t for t in titles if t.endswith("(n=2)")] == ["sbn23 (n=2)", "bn (n=2)"]
    assert [t for t in titles if t.endswith("seeds)")] == ["sbn23 (n=2 seeds)", "bn (n=2 seeds)"]
    assert {"low-pass filtered inputs", "high-pass filtered inputs"} <= set(titles)
    assert {*CORRUPTIONS, "mean over corruptions"} <= set(titles)
    assert any("| mean corruption error | bn |" in o.get("text", "") for o in dashboard.outputs)
