"""The search page in a real browser: headless Chromium (Debian's chromium and chromium-driver),
driven by Selenium against a live ``imgdb serve``, uploads a real museum photo and must show its
painting first; then "search with this image", and a refused URL's reason on the page.

Skips with a message where Chromium or its driver is missing, unless IMGDB_REQUIRE_BROWSER=1
(``.ci/run`` sets it after installing them), where a missing browser fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LiveServer

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: Where the README's screenshot comes from: IMGDB_SCREENSHOT=docs/search-page.png pytest tests/test_browser.py
SCREENSHOT = os.environ.get("IMGDB_SCREENSHOT")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM and CHROMEDRIVER):
        message = "headless Chromium is not installed: apt-get install chromium chromium-driver"
        if os.environ.get("IMGDB_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No sandbox as root; no background networking: this machine's network is closed, and Chromium
    # would keep trying to reach its own services.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def results(driver: webdriver.Chrome) -> list[dict]:
    """What the grid shows: per card, the file name, the id and the distance as displayed."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#results .hit')].map((card) => ({
          name: card.querySelector('.name').textContent, id: Number(card.dataset.id),
          distance: Number(card.querySelector('dd').textContent),
          loaded: card.querySelector('img').complete && card.querySelector('img').naturalWidth > 0}));""")


def wait_for_status(driver: webdriver.Chrome, words: str) -> str:
    WebDriverWait(driver, 120).until(ec.text_to_be_present_in_element((By.ID, "status"), words))
    return driver.find_element(By.ID, "status").text


def test_upload_shows_the_painting_first(browser: webdriver.Chrome, live_server: LiveServer, museum_sample: Path,
                                         tmp_path: Path) -> None:
    query = json.loads((museum_sample / "queries.json").read_text())[0]
    painting = Path(query["relevant"][0]).name
    browser.get(f"{live_server.url}/")
    assert browser.title.startswith("imgdb")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("8")
    browser.find_element(By.ID, "file").send_keys(str((museum_sample / query["query"]).resolve()))
    assert "8 results" in wait_for_status(browser, "results for")
    WebDriverWait(browser, 60).until(lambda d: all(hit["loaded"] for hit in results(d)))
    hits = results(browser)
    assert len(hits) == 8 and hits[0]["name"] == painting
    assert hits == sorted(hits, key=lambda hit: hit["distance"])
    assert browser.find_element(By.ID, "query").is_displayed()  # the query photo is shown above the grid
    shot = tmp_path / "search-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if SCREENSHOT:
        shutil.copyfile(shot, SCREENSHOT)

    # "search with this image" on the second hit: it comes back first, at distance zero.
    second = hits[1]
    browser.find_elements(By.CSS_SELECTOR, "#results .hit button")[1].click()
    wait_for_status(browser, f"image {second['id']} in")
    again = results(browser)
    assert again[0]["id"] == second["id"] and again[0]["distance"] == 0


def test_refused_url_shows_its_reason(browser: webdriver.Chrome, live_server: LiveServer) -> None:
    browser.get(f"{live_server.url}/")
    browser.find_element(By.ID, "url").send_keys(f"{live_server.url}/images/1")
    browser.find_element(By.ID, "go-url").click()
    WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.ID, "status"), "loopback"))
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("class") == "error"
    assert "loopback" in status.text and "private and local addresses are not fetched" in status.text


def test_verified_hits_are_marked_their_matches_shown_and_absent_paintings_say_no_match(
        browser: webdriver.Chrome, live_server: LiveServer, client, museum_sample: Path, museum: Path) -> None:  # noqa: ANN001
    from selenium.webdriver.support.ui import Select

    client.create_index("page_checked", "color:hsv")
    client.verify_index("page_checked")
    client.ingest([museum_sample / "images"], index="page_checked")
    inside = json.loads((museum_sample / "queries.json").read_text())
    present = {q["query"] for q in inside}
    absent = next(q for q in json.loads((museum / "queries.json").read_text()) if q["query"] not in present)
    browser.get(f"{live_server.url}/")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#index option[value=page_checked]"))
    Select(browser.find_element(By.ID, "index")).select_by_value("page_checked")
    assert browser.find_element(By.ID, "verify").is_enabled()
    browser.find_element(By.ID, "verify").click()
    browser.find_element(By.ID, "file").send_keys(str((museum_sample / inside[0]["query"]).resolve()))
    assert "1 verified match" in wait_for_status(browser, "verified match")
    first = browser.find_element(By.CSS_SELECTOR, "#results .hit")
    assert "verified" in first.get_attribute("class")
    assert first.find_element(By.CSS_SELECTOR, ".name").text == Path(inside[0]["relevant"][0]).name
    first.find_element(By.XPATH, ".//button[text()='show the matches']").click()
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "const i = document.querySelector('#explain img'); return i.complete && i.naturalWidth > 0"))
    assert browser.find_element(By.ID, "explain").is_displayed()
    browser.find_element(By.ID, "explain").click()
    browser.find_element(By.ID, "file").send_keys(str((museum / absent["query"]).resolve()))
    assert "no match" in wait_for_status(browser, "no match")
    assert not browser.find_elements(By.CSS_SELECTOR, "#results .hit.verified")


def test_duplicates_view_shows_each_group_side_by_side_with_its_evidence(
        browser: webdriver.Chrome, live_server: LiveServer, client, museum_sample: Path, tmp_path: Path) -> None:  # noqa: ANN001
    from PIL import Image
    from selenium.webdriver.support.ui import Select

    paintings = sorted((museum_sample / "images").glob("*.jpg"))[:12]
    copies = []
    for painting in paintings[:2]:  # (two paintings with two copies each: a smaller one, a cropped one)
        image = Image.open(painting).convert("RGB")
        copies.append(tmp_path / f"{painting.stem}__half.png")
        image.resize((image.width // 2, image.height // 2)).save(copies[-1])
        copies.append(tmp_path / f"{painting.stem}__crop.png")
        image.crop((image.width // 10, image.height // 10, image.width, image.height)).save(copies[-1])
    client.create_index("page_dups", "color:hsv")
    client.verify_index("page_dups")
    client.ingest([*paintings, *copies], index="page_dups")
    client.calibrate("page_dups", sample=10)
    groups = client.duplicates("page_dups", level="near").groups
    assert groups
    browser.get(f"{live_server.url}/")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#index option[value=page_dups]"))
    Select(browser.find_element(By.ID, "index")).select_by_value("page_dups")
    browser.find_element(By.ID, "show-duplicates").click()
    wait_for_status(browser, "groups of duplicates in page_dups")
    shown = browser.execute_script("""
        return [...document.querySelectorAll('#results section.group')].map((box) => ({
          title: box.querySelector('h2').textContent,
          ids: [...box.querySelectorAll('.hit')].map((card) => Number(card.dataset.id)),
          first: box.querySelector('.hit').classList.contains('representative'),
          scores: [...box.querySelectorAll('.hit')].map((card) => card.textContent.includes('score'))}));""")
    near = [box for box in shown if box["title"].startswith("near")]
    assert [box["ids"] for box in near] == [[image["id"] for image in g["images"]] for g in groups]
    assert all(box["first"] and all(box["scores"]) for box in near)
    # The evidence of a verified member: its matches with the representative, overlaid.
    member = browser.find_element(By.CSS_SELECTOR, "#results section.group .hit:not(.representative)")
    member.find_element(By.XPATH, ".//button[text()='show the matches']").click()
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "const i = document.querySelector('#explain img'); return i.complete && i.naturalWidth > 0"))
    assert browser.find_element(By.ID, "explain").is_displayed()
    browser.find_element(By.ID, "explain").click()
