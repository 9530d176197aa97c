"""The dashboards run top to bottom, headless, against real studies, and draw labelled figures."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FinishedStudy, run_small_study

pytestmark = pytest.mark.slow

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
# Notebook → the figures it draws.
FIGURES = {"study_overview": 3, "feature_maps": 5, "placement": 2}

# A second small study, for what the shared ASHA one does not promise: it searches norm.kind, so that the 2bn
# control is among the arms, and it has no scheduler, so that every trial completes (the importance figure
# needs two completed trials). All its trials come from the seeded random start-up sampler, so the arms do
# not depend on trial timing: seed 2 draws 2bn23, sbn23, sbn-all and bn.
CONTROL_STUDY_OVERRIDES = [
    "name=e2e-control",
    "search.num_samples=4",
    "search.sampler.seed=2",
    "search.sampler.n_startup_trials=4",
    "search.scheduler.type=none",
    "train.epochs=2",
    "search.space.norm.kind={choice: [sbn, 2bn]}",
]

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


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_and_draws_its_figures_with_labelled_axes(
    name: str, small_study: FinishedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    dashboard = run_dashboard(name, small_study, monkeypatch)
    figures = [o for o in dashboard.outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= FIGURES[name]
    assert len({ax["figure"] for ax in dashboard.axes}) >= FIGURES[name]


def test_overview_ranks_the_importance_of_every_searched_parameter(
    control_study: FinishedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    dashboard = run_dashboard("study_overview", control_study, monkeypatch)
    importance = dashboard.axes_titled("parameter importance")
    searched = list(control_study.spec.search.space)
    # One bar per searched parameter, not the "not enough completed trials" fallback (an empty, hidden axes).
    assert importance["title"] == "e2e-control: parameter importance over 4 completed trials"
    assert importance["shown"] and importance["bars"] == len(searched), importance
    assert sorted(importance["yticks"]) == sorted(searched)
    assert not importance["texts"]
    assert not [o for o in dashboard.outputs if "no parameter importance" in o.get("text", "")]


def test_placement_shows_sbn_against_its_2bn_control_and_plain_bn(
    control_study: FinishedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    dashboard = run_dashboard("placement", control_study, monkeypatch)
    by_placement = dashboard.axes_titled("validation accuracy by placement")
    # Tick labels read "<arm>\n(n=<compared trials>)"; every trial completed, so each arm has one.
    arms = dict(tick.split("\n") for tick in by_placement["xticks"])
    assert arms == {"bn": "(n=1)", "sbn23": "(n=1)", "2bn23": "(n=1)", "sbn-all": "(n=1)"}
