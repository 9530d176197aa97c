"""The study as a person sees it in MLflow's UI: `sbn-study ui` on a finished quick-start store, opened through
the links it prints, in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which CI installs).

With SBN_STUDY_SCREENSHOTS=DIR the runs and charts views are kept there as PNGs (the README's are in docs/):
    SBN_STUDY_SCREENSHOTS=docs python -m pytest tests/test_ui_browser.py
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sbn_study.store.ui import best_so_far
from tests.conftest import FinishedStudy
from tests.servers import sbn_study_ui

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# MLflow's UI is a React app that goes on loading (runs, then metric histories) after the page has.
PAGE_WAIT_S = 90
# A screenshot this wide shows the table's first columns and the first row of charts; smaller in docs/.
WINDOW = (1400, 900)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
        reason=f"needs Chromium and its driver at {CHROMIUM} and {CHROMEDRIVER} "
        "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)",
    ),
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with a profile of its own: no remembered MLflow view, nothing fetched from outside."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def printed_links(log: Path, study: str) -> dict[str, str]:
    """The links `sbn-study ui` printed under the study's name: {"runs": ..., "charts": ...}."""
    lines = log.read_text().splitlines()
    at = lines.index(f"  {study}")
    return dict(line.strip().split(": ", 1) for line in lines[at + 1 : at + 3])


def wait_for(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, PAGE_WAIT_S, poll_frequency=0.5).until(condition, message=what)


def page_text(driver: Any) -> str:
    return str(driver.execute_script("return document.body.innerText"))


def chart_card(driver: Any, title: str) -> Any:
    """The chart card titled `title` once its plot has a line in it, else None."""
    from selenium.webdriver.common.by import By

    # A card is a resizable box (react-resizable's class) holding its title and its plotly plot.
    cards = driver.find_elements(
        By.XPATH, f"//h4[normalize-space()='{title}']/ancestor::*[contains(@class, 'react-resizable')][1]"
    )
    return next((card for card in cards if card.find_elements(By.CSS_SELECTOR, "svg path.js-line")), None)


def screenshot(driver: Any, name: str, folder: Path) -> None:
    """The page as a small PNG (a 64-colour palette: UI screenshots are flat colours)."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        close.click()  # MLflow's assistant panel would take a third of the picture
    path = folder / f"mlflow-{name}.png"
    driver.save_screenshot(str(path))
    Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)


def test_the_links_sbn_study_ui_prints_open_the_ranked_trial_runs_and_their_charts(
    small_study: FinishedStudy, tmp_path: Path, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    from sbn_study.store.runs import open_client, trial_runs

    study, outcome = small_study.spec.name, small_study.outcome
    runs = trial_runs(open_client(small_study.tracking_uri), outcome.experiment_id, outcome.parent_run_id)
    val_acc = {run.info.run_name: run.data.metrics["val_acc"] for run in runs}
    shots = Path(os.environ.get("SBN_STUDY_SCREENSHOTS") or tmp_path)

    log = tmp_path / "ui.log"
    with sbn_study_ui(small_study.output, log):
        links = printed_links(log, study)
        assert links["runs"].endswith("/runs?workflowType=machine_learning&viewStateShareKey=sbn-study")

        # A fresh browser lands on the model-training runs page, not MLflow's GenAI overview: every trial run
        # listed flat, best first, with the study's metric as a column.
        browser.get(links["runs"])
        wait_for(browser, lambda d: all(name in page_text(d) for name in val_acc), "the trial runs listed")
        assert "/runs?workflowType=machine_learning" in browser.current_url
        headers = browser.find_elements(By.XPATH, "//*[@role='columnheader'][normalize-space()='val_acc']")
        assert headers, "no val_acc column"
        row_of = {
            link.text: int(
                link.find_element(By.XPATH, "./ancestor::*[@row-index][1]").get_attribute("row-index")
            )
            for link in browser.find_elements(By.XPATH, "//a[normalize-space()]")
            if link.text in val_acc
        }
        in_rows = [val_acc[name] for name in sorted(row_of, key=row_of.__getitem__)]
        assert len(in_rows) == len(val_acc) and in_rows == sorted(in_rows, reverse=True)
        assert str(in_rows[0]) in page_text(browser)  # the best trial's val_acc, in its column
        screenshot(browser, "runs", shots)

        # The charts: the study's metric first, every trial's curve in it; the study's progress (the parent
        # run's metrics) in a section of its own.
        browser.get(links["charts"])
        card = wait_for(browser, lambda d: chart_card(d, "val_acc"), "a drawn val_acc chart")
        assert card.find_elements(By.CSS_SELECTOR, "svg.main-svg")
        screenshot(browser, "charts", shots)
        section = browser.find_element(By.XPATH, "//*[normalize-space()='study']")
        browser.execute_script("arguments[0].scrollIntoView()", section)
        wait_for(browser, lambda d: chart_card(d, best_so_far("val_acc")), "the study's best-so-far chart")
