"""How MLflow's UI shows a study: its experiment marked as model training, one view of its trial runs that a
link opens, and the names of the study-level metrics of its parent run.

MLflow 3 opens an experiment on its GenAI pages (traces, token usage) unless the link asks for
`workflowType=machine_learning`, and remembers the last choice in the browser. Its runs table shows no metric
columns and nests every trial run, collapsed, under the study's parent run; its charts then count only the
parent's metrics. A view stored on the experiment as the tag `mlflow.sharedViewState.<key>` (what the UI's
own "Share" button writes) is applied by any link carrying `viewStateShareKey=<key>`: here the trial runs
flat and ranked by the study's metric, with its columns, and the charts of that metric first.

No MLflow import: `run` and `ui` print the links without touching a store.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

if TYPE_CHECKING:
    from sbn_study.spec import StudySpec

# Read by MLflow 3 versions that choose an experiment's pages by its kind rather than by the link; the UI
# writes its own guess there when the tag is missing.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
VIEW_KEY = "sbn-study"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# A run's Markdown description in the UI.
NOTE_TAG = "mlflow.note.content"
DEFAULT_UI_URL = "http://127.0.0.1:5000"

# The parent run's metrics, step = trials finished: MLflow's charts put them in a section of their own.
STUDY_PREFIX = "study/"
TRIALS_FINISHED = f"{STUDY_PREFIX}trials_finished"

# MLflow's name for the chart section of the metrics without a prefix; its other sections come after ours.
_MODEL_SECTION = "Model metrics"
_SHOWN_METRICS = ("val_acc", "val_loss")
_RUN_NAME_COLUMN = "attributes.`Run Name`"


def best_so_far(metric: str) -> str:
    """The parent run's metric of the best value of `metric` among the trials finished so far."""
    return f"{STUDY_PREFIX}best_{metric}"


def trials_with_status(status: str) -> str:
    return f"{STUDY_PREFIX}trials_{status}"


def experiment_tags(spec: StudySpec) -> dict[str, str]:
    """The study's experiment as MLflow's UI should show it: model training, with the study's view."""
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING, VIEW_TAG: json.dumps(study_view(spec))}


def study_view(spec: StudySpec) -> dict[str, Any]:
    """The runs page of the study: trial runs ranked by its metric's last value (flat: a sorted table does not
    nest runs under their parent), the metrics, status and searched parameters as columns, and charts of the
    metrics first, then the study-level ones; every run drawn, the parent included (by default the first 10)."""
    metric, mode = spec.search.metrics[0], spec.search.modes[0]
    metrics = list(dict.fromkeys([*spec.search.metrics, *_SHOWN_METRICS]))
    params = list(dict.fromkeys(["norm.placement", *spec.search.space]))
    model, study = "sbn-model-metrics", "sbn-study-metrics"
    charts = [_line_chart(m, model) for m in metrics]
    charts += [_line_chart(m, study) for m in (best_so_far(metric), TRIALS_FINISHED)]
    columns = [
        "tags.`sbn.status`",
        *(f"metrics.`{m}`" for m in metrics),
        *(f"params.`{p}`" for p in params),
    ]
    return {
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": mode == "min",
        "selectedColumns": columns,
        # Wide enough for a run's name (number, arm, sampled values), then the columns in this order.
        "columnOrder": [_RUN_NAME_COLUMN, *columns],
        "columnWidths": {_RUN_NAME_COLUMN: 420},
        "compareRunCharts": charts,
        # Reordered: sections keep this order, and the charts MLflow adds for the other metrics go after ours.
        "compareRunSections": [
            {"uuid": model, "name": _MODEL_SECTION, "display": True, "isReordered": True},
            {"uuid": study, "name": STUDY_PREFIX.rstrip("/"), "display": True, "isReordered": True},
        ],
        "isAccordionReordered": True,
        "runsHiddenMode": "SHOW_ALL",
    }


def _line_chart(metric: str, section: str) -> dict[str, Any]:
    return {
        "uuid": f"sbn-chart-{metric}",
        "type": "LINE",
        "metricSectionId": section,
        "metricKey": metric,
        "selectedMetricKeys": [metric],
        "isGenerated": True,
        "deleted": False,
        "runsCountToCompare": 10,
    }


def served_ui(tracking_uri: str) -> str | None:
    """The UI of a tracking server is the server itself; a local store has none until `sbn-study ui`."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def runs_link(ui_url: str, experiment_id: str, charts: bool = False, view: bool = True) -> str:
    """The experiment's runs in MLflow's model-training pages (its charts with `charts`), in the study's
    view unless `view` is False (an experiment without one)."""
    query = {"workflowType": "machine_learning"}
    if view:
        query["viewStateShareKey"] = VIEW_KEY
    if charts:
        query["compareRunsMode"] = "CHART"
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def experiment_links(client: Any, ui_url: str) -> list[tuple[str, str, str]]:
    """(name, runs link, charts link) of every model-training experiment of the store, oldest first."""
    experiments = client.search_experiments(
        filter_string=f"tags.`{EXPERIMENT_KIND_TAG}` = '{MODEL_TRAINING}'", order_by=["creation_time ASC"]
    )
    links = []
    for experiment in experiments:
        view = VIEW_TAG in experiment.tags
        runs, charts = (runs_link(ui_url, experiment.experiment_id, c, view) for c in (False, True))
        links.append((experiment.name, runs, charts))
    return links
