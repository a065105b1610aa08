"""The grader review page in a real browser (Debian's headless Chromium driven by Selenium): review a
synthetic volume with the keyboard and the mouse, then find exactly those verdicts in the database.

Screenshots go to $HRF_BATCH_SCREENSHOTS (default: the test's temporary folder) to be looked at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from threading import Thread
from typing import Any

import numpy as np
import pytest

from hrf_batch.review.server import ReviewServer, start
from hrf_batch.store import open_store

from conftest_store import row_counts
from test_review_api import MISSED_BSCAN, REVIEW_TABLES, ReviewStudy, build_review_study

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason=f"needs Debian's Chromium ({CHROMIUM}) and its driver ({CHROMEDRIVER}): apt install chromium "
                              "chromium-driver"),
]
WAIT_S = 20.0


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> ReviewStudy:
    return build_review_study(tmp_path_factory.mktemp("browser") / "study")


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("HRF_BATCH_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def serve(db: str, grader: str | None) -> Iterator[ReviewServer]:
    with open_store(db) as store:
        server = start(store, port=0, grader=grader)
        thread = Thread(target=server.run, daemon=True)
        thread.start()
        try:
            yield server
        finally:
            server.stop()
            thread.join(10)


def copy_db(study: ReviewStudy, folder: Path) -> str:
    path = folder / "review.sqlite"
    shutil.copy(study.db.removeprefix("sqlite:///"), path)
    return f"sqlite:///{path}"


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException:
        message = js(driver, "(document.getElementById('message') || {}).textContent")
        pytest.fail(f"waited {WAIT_S:.0f} s for {what}; page message: {message!r}")


def js(driver: Any, expression: str) -> Any:
    """One value read in the page at once (the page redraws its lists, so element handles go stale)."""
    return driver.execute_script(f"return {expression};")


def lesion_class(driver: Any, index: int) -> str:
    return js(driver, f"(document.querySelector(\"#lesions li[data-lesion='{index}']\") || {{}}).className || ''")


def on_bscan(driver: Any, index: int) -> None:
    wait_for(driver, lambda d: js(d, "document.getElementById('bscan-index').textContent") == str(index + 1)
             and js(d, "document.getElementById('bscan').complete"), f"B-scan {index + 1}")


def press(driver: Any, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


def test_a_grader_reviews_a_volume_with_keyboard_and_mouse(study: ReviewStudy, browser: Any, shots: Path,
                                                           tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    db = copy_db(study, tmp_path)
    with serve(db, "AB") as server:
        browser.get(server.url)
        wait_for(browser, lambda d: d.find_elements("css selector", "#patients a"), "the list of patients")
        assert "token" not in browser.current_url  # swapped for a cookie
        browser.save_screenshot(str(shots / "01_patients.png"))
        browser.find_element("link text", "P001").click()  # mouse: patient -> visit -> volume
        wait_for(browser, lambda d: d.find_elements("link text", "Review"), "the patient's volumes")
        browser.save_screenshot(str(shots / "02_patient.png"))
        browser.find_element("css selector", f"a[href='/run/{study.run_id}']").click()
        on_bscan(browser, 0)

        # keyboard: next B-scan, accept the selected (first undecided) lesion, reject the next one
        press(browser, "n")
        on_bscan(browser, 1)
        press(browser, "a")
        wait_for(browser, lambda d: "accept" in lesion_class(d, 0), "lesion 1 accepted")
        press(browser, "r")
        wait_for(browser, lambda d: "reject" in lesion_class(d, 1), "lesion 2 rejected")
        browser.save_screenshot(str(shots / "03_keyboard_verdicts.png"))

        # mouse: a missed HRF by shift-click at its centre; the page opens fitted to the viewer
        image = browser.find_element("id", "bscan")
        assert js(browser, "[document.getElementById('bscan').naturalWidth, document.getElementById('bscan').naturalHeight]"
                  ) == [256, 248]  # served at full resolution
        scale = image.size["width"] / 256
        assert scale > 2 and abs(image.size["height"] / 248 - scale) < 0.01
        row, col = study.missed_rc
        offset = (round((col + 0.5) * scale - image.size["width"] / 2), round((row + 0.5) * scale - image.size["height"] / 2))
        (ActionChains(browser).move_to_element_with_offset(image, *offset)
         .key_down(Keys.SHIFT).click().key_up(Keys.SHIFT).perform())
        wait_for(browser, lambda d: js(d, "document.querySelectorAll('#added li').length") == 1, "the added lesion")
        assert browser.find_elements("css selector", "#overlay g.added.mine path.outline")
        press(browser, "++")
        browser.save_screenshot(str(shots / "04_missed_added_zoomed.png"))
        press(browser, "f")

        # mouse: next B-scan by its button, click a lesion on the image, accept with the button
        browser.find_element("id", "next").click()
        on_bscan(browser, 2)
        ActionChains(browser).click(browser.find_element("css selector", "#overlay g[data-lesion='1'] rect.hit")).perform()
        wait_for(browser, lambda d: "selected" in lesion_class(d, 1), "lesion 2 selected")
        browser.find_element("id", "accept").click()
        wait_for(browser, lambda d: "accept" in lesion_class(d, 1), "lesion 2 of B-scan 3 accepted")

        # keyboard: after a verdict the next undecided lesion is selected; Tab and Shift+Tab move between lesions
        wait_for(browser, lambda d: "selected" in lesion_class(d, 2), "lesion 3 selected after the verdict")
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
        wait_for(browser, lambda d: "selected" in lesion_class(d, 1), "Shift+Tab to lesion 2")
        press(browser, Keys.TAB + Keys.TAB)
        wait_for(browser, lambda d: "selected" in lesion_class(d, 0), "Tab twice, round to lesion 1")

        # keyboard: the next B-scan not yet reviewed (B-scans 2 and 3 are partly done), say it has no HRF,
        # show the relevance map
        press(browser, "u")
        on_bscan(browser, 3)
        press(browser, "x")
        wait_for(browser, lambda d: "chosen" in js(d, "document.getElementById('hrf-no').className"), "'no HRF'")
        press(browser, "h")
        wait_for(browser, lambda d: d.find_element("id", "relevance").is_displayed(), "the relevance map")
        browser.save_screenshot(str(shots / "05_no_hrf_relevance.png"))
        press(browser, "?")
        wait_for(browser, lambda d: d.find_element("id", "help").is_displayed(), "the help")
        browser.save_screenshot(str(shots / "06_help.png"))

    with open_store(db) as store:
        state = store.review_state(study.run_id)
    assert [(v.bscan_index, v.lesion_index, v.grader, v.verdict) for v in state.lesion_verdicts] == [
        (1, 0, "AB", "accept"), (1, 1, "AB", "reject"), (2, 1, "AB", "accept")]
    assert [(v.bscan_index, v.grader, v.has_hrf) for v in state.bscan_verdicts] == [(3, "AB", False)]
    (added,) = state.added_lesions
    assert (added.bscan_index, added.grader, added.segmenter) == (MISSED_BSCAN, "AB", "region-growing")
    assert added.click_rc == study.missed_rc
    drawn = np.zeros(study.missed_label.shape, bool)
    r0, c0, r1, c1 = added.bbox_rc
    drawn[r0:r1, c0:c1] = added.mask
    assert 2 * (drawn & study.missed_label).sum() / (drawn.sum() + study.missed_label.sum()) > 0.7


def test_the_page_refuses_without_the_token_and_is_read_only_without_a_grader(study: ReviewStudy, browser: Any,
                                                                              shots: Path, tmp_path: Path) -> None:
    db = copy_db(study, tmp_path)
    with serve(db, None) as server:
        browser.get(server.base_url + f"/run/{study.run_id}")
        assert "needs its access token" in browser.find_element("tag name", "body").text
        browser.get(server.url.replace("/?", f"/run/{study.run_id}?"))
        on_bscan(browser, 0)
        assert browser.find_element("id", "mode").text == "read-only"
        assert all(not browser.find_element("id", b).is_enabled() for b in ("accept", "reject", "hrf-yes", "hrf-no"))
        press(browser, "a")
        wait_for(browser, lambda d: "read-only" in js(d, "document.getElementById('message').textContent"),
                 "the read-only message")
        browser.save_screenshot(str(shots / "07_read_only.png"))
    assert set(row_counts(db, REVIEW_TABLES).values()) == {0}
