"""The web app end to end in a real browser: `simsiam-embed serve` on a loopback port, driven by
Playwright through Debian's Chromium (headless). Upload a query, see its results, click one to
search from it, open the duplicates view; a screenshot of each step lands in the test's folder."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import CONSOLE_SCRIPT, indexed_folder_with_a_copy

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright (in [dev]) is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run installs it where it can)",
                allow_module_level=True)


@pytest.fixture
def server(tmp_path: Path):
    paths = indexed_folder_with_a_copy(tmp_path, 24)
    process = subprocess.Popen([str(CONSOLE_SCRIPT), "serve", "--port", "0"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()   # printed once the socket is bound
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + process.stderr.read() if process.poll() is not None else line
        yield f"http://127.0.0.1:{match.group(1)}", tmp_path, paths
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_search_by_upload_then_by_click_then_the_duplicates_view(server):
    url, folder, paths = server
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            playwright_api.expect(page.locator("#status")).to_contain_text("25 images")

            page.set_input_files("#file-input", str(paths[7]))
            results = page.locator("#results figure")
            playwright_api.expect(results).to_have_count(20)
            assert paths[7].name in results.first.get_attribute("title")
            assert results.first.locator("figcaption").inner_text().startswith("1. 1.000")
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(folder / "1-upload.png"), full_page=True)

            clicked = results.nth(1).get_attribute("title")
            results.nth(1).click()
            playwright_api.expect(page.locator("#query figure")).to_have_attribute("title", clicked)
            playwright_api.expect(page.locator("#results figure")).to_have_count(20)
            assert clicked not in [figure.get_attribute("title") for figure in page.locator("#results figure").all()]
            page.screenshot(path=str(folder / "2-clicked.png"), full_page=True)

            page.click("button[data-view=duplicates]")
            group = page.locator("#view-duplicates section")
            playwright_api.expect(group).to_have_count(1)
            titles = {figure.get_attribute("title") for figure in group.locator("figure").all()}
            assert titles == {str(paths[0]), str(paths[0].parent / "copy-of-first.png")}
            page.screenshot(path=str(folder / "3-duplicates.png"), full_page=True)

            for view in ("clusters", "outliers", "map"):
                page.click(f"button[data-view={view}]")
                playwright_api.expect(page.locator(f"#view-{view} .error")).to_have_count(0)
            playwright_api.expect(page.locator("#map-note")).to_contain_text("PCA")
            # Hovering a point shows that image: the canvas position of one point, from the page.
            x, y = page.evaluate("mapView.positionOf(mapView.points[3])")
            box = page.locator("#map").bounding_box()
            page.mouse.move(box["x"] + x * box["width"] / 1000, box["y"] + y * box["height"] / 700)
            tip = page.locator("#tip")
            playwright_api.expect(tip).to_be_visible()
            playwright_api.expect(tip.locator("img")).to_have_attribute("src", re.compile(r"/api/thumbnails/\d+$"))
            page.screenshot(path=str(folder / "4-map.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
    for name in ("1-upload.png", "2-clicked.png", "3-duplicates.png"):
        assert (folder / name).stat().st_size > 5_000
