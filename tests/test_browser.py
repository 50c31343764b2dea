"""The web app end to end in a real browser: `simsiam-embed serve` on a loopback port, driven by
Playwright through Debian's Chromium (headless), with any request to another host failing the
test. Search a page at a time, see an image whole with its facts and neighbours, move with the
keyboard, change and export a dedup plan, zoom and select on the map, read /docs; a screenshot of
each step lands in the test's folder."""

from __future__ import annotations

import contextlib
import json
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
    (tmp_path / "not-an-image.txt").write_text("plain text, not an image")
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


@contextlib.contextmanager
def opened_browser(folder: Path):
    """Chromium and a page, with every request watched: one to another host fails the test (the
    app and /docs must work with no network), and so does any script error on the page."""
    with playwright_api.sync_playwright() as playwright:
        browser, page = launch(playwright, folder)
        try:
            yield browser, page
            assert page.errors == [] and page.foreign == []
        finally:
            browser.close()


def launch(playwright, folder: Path):
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
    page = browser.new_page(accept_downloads=True, viewport={"width": 1280, "height": 1100})   # the whole map in view
    page.errors, page.foreign = [], []
    page.on("pageerror", lambda error: page.errors.append(str(error)))

    def only_this_machine(route):
        if route.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            route.continue_()
        else:
            page.foreign.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_machine)
    return browser, page


def tab_to(page, selector: str, presses: int = 40) -> None:
    """Press Tab until ``selector`` has the focus: it must be reachable from the keyboard."""
    for _ in range(presses):
        page.keyboard.press("Tab")
        if page.evaluate(f"document.activeElement === document.querySelector({selector!r})"):
            return
    raise AssertionError(f"{selector} is never reached with Tab")


def test_search_pages_view_and_keyboard(server):
    url, folder, paths = server
    with opened_browser(folder) as (browser, page):
        page.goto(url)
        playwright_api.expect(page.locator("#status")).to_contain_text("25 images")

        page.select_option("#page-size", "10")
        page.set_input_files("#file-input", str(paths[7]))
        results = page.locator("#results figure")
        playwright_api.expect(results).to_have_count(10)
        assert paths[7].name in results.first.get_attribute("title")
        assert results.first.locator("figcaption").inner_text().startswith("1. 1.000")
        # The folder too: image_0008.jpg appeared twice in one search, from two folders.
        assert results.first.locator("figcaption").inner_text().endswith(f"{paths[7].parent.name}/{paths[7].name}")
        page.click("#more")   # the next page of the same query
        playwright_api.expect(results).to_have_count(20)
        page.click("#more")
        playwright_api.expect(results).to_have_count(25)   # every image: no more to ask for
        playwright_api.expect(page.locator("#more")).to_be_hidden()
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(folder / "1-search.png"), full_page=True)

        # Up and Down move between the lines of tiles (they did nothing).
        results.first.focus()
        top = results.first.bounding_box()["y"]
        page.keyboard.press("ArrowDown")
        assert page.evaluate("document.activeElement.getBoundingClientRect().top") > top + 10
        page.keyboard.press("ArrowUp")
        assert page.evaluate("document.activeElement.title") == results.first.get_attribute("title")

        # Keyboard: focus the first result, move right, open it whole with Enter.
        results.first.focus()
        page.keyboard.press("ArrowRight")
        second = results.nth(1).get_attribute("title")
        assert page.evaluate("document.activeElement.title") == second
        page.keyboard.press("Enter")
        viewer = page.locator("#viewer")
        playwright_api.expect(viewer).to_be_visible()
        playwright_api.expect(page.locator("#viewer-title")).to_have_text(Path(second).name)
        playwright_api.expect(page.locator("#viewer-facts")).to_contain_text("32 x 32 px")
        playwright_api.expect(page.locator("#viewer-neighbours figure")).to_have_count(8)
        page.wait_for_function("document.getElementById('viewer-image').naturalWidth === 32")
        page.screenshot(path=str(folder / "2-viewer.png"), full_page=True)
        third = results.nth(2).get_attribute("title")
        page.keyboard.press("ArrowRight")   # the next result, in the viewer
        playwright_api.expect(page.locator("#viewer-title")).to_have_text(Path(third).name)
        page.click("#viewer-search")
        playwright_api.expect(viewer).to_be_hidden()
        playwright_api.expect(page.locator("#query figure")).to_have_attribute("title", third)

        page.keyboard.press("Escape")
        # The upload is reachable with Tab (a label around a hidden input was not), and Enter on
        # it asks the file input for its chooser (whether headless Chromium then shows one is
        # the browser's affair: under CI it did not always).
        page.goto(url)
        page.evaluate("document.getElementById('file-input').addEventListener('click', "
                      "event => { window.chooserAsked = true; event.preventDefault(); })")
        tab_to(page, "#choose-file")
        page.keyboard.press("Enter")
        page.wait_for_function("window.chooserAsked === true")
        page.set_input_files("#file-input", str(folder / "not-an-image.txt"))
        playwright_api.expect(page.locator("#message.error")).to_contain_text("cannot read the uploaded image")
        assert '"' not in page.locator("#message").inner_text()   # a sentence, not a JSON-quoted string
    for name in ("1-search.png", "2-viewer.png"):
        assert (folder / name).stat().st_size > 5_000


def test_duplicates_plan_map_and_docs(server):
    url, folder, paths = server
    copy = paths[0].parent / "copy-of-first.png"
    with opened_browser(folder) as (browser, page):
        page.goto(url)
        page.click("button[data-view=duplicates]")
        group = page.locator("#view-duplicates section")
        playwright_api.expect(group).to_have_count(1)
        titles = [figure.get_attribute("title") for figure in group.locator("figure").all()]
        assert set(titles) == {str(paths[0]), str(copy)}
        playwright_api.expect(group.locator("figure.keep")).to_have_count(1)
        # Double-clicking a tile to view it changed the keeper, and Enter changed the keeper
        # instead of opening the image: a tile opens the image, and only its button keeps it.
        other = group.locator("figure.remove")
        first_keeper = group.locator("figure.keep").get_attribute("title")
        other.dblclick()
        playwright_api.expect(page.locator("#viewer")).to_be_visible()
        page.keyboard.press("Escape")
        other.focus()
        page.keyboard.press("Enter")
        playwright_api.expect(page.locator("#viewer")).to_be_visible()
        page.keyboard.press("Escape")
        playwright_api.expect(group.locator("figure.keep")).to_have_attribute("title", first_keeper)
        # Side by side at full size, with their facts.
        group.locator("figure.remove button.compare").click()
        playwright_api.expect(page.locator("#compare")).to_be_visible()
        playwright_api.expect(page.locator("#compare .compare-side")).to_have_count(2)
        playwright_api.expect(page.locator("#compare .compare-side").nth(1)).to_contain_text("x 32 px")
        page.keyboard.press("Escape")
        playwright_api.expect(page.locator("#viewer")).to_be_hidden()
        # The user keeps the other one: stored with the index, so a reload keeps it, and the
        # exported plan is the same plan.json dedup writes.
        kept = group.locator("figure.remove").get_attribute("title")
        group.locator("figure.remove button.keep-this").click()
        playwright_api.expect(group.locator("figure.keep")).to_have_attribute("title", kept)
        playwright_api.expect(group.locator("figure.keep")).to_contain_text("(your choice)")
        page.reload()
        page.click("button[data-view=duplicates]")
        playwright_api.expect(group.locator("figure.keep")).to_have_attribute("title", kept)
        with page.expect_download() as download_info:
            page.click("#export-json")
        plan = json.loads(Path(download_info.value.path()).read_text())
        assert plan["keep"] == [kept] and [r["path"] for r in plan["remove"]] == [t for t in titles if t != kept]
        with page.expect_download() as download_info:
            page.click("#export-csv")
        assert Path(download_info.value.path()).read_text().splitlines()[1] == f"keep,{kept},1,"
        playwright_api.expect(page.locator("#plan-notes")).to_contain_text("1 files kept, 1 to remove")
        # Another plan rule keeps the user's own choice (it was silently dropped).
        with page.expect_response(lambda response: "/api/duplicates?plan=keep-first" in response.url):
            page.select_option("#plan-rule", "keep-first")
        playwright_api.expect(page.locator("#plan-rule")).to_be_enabled()   # the view redrawn
        playwright_api.expect(group.locator("figure.keep")).to_have_attribute("title", kept)
        page.screenshot(path=str(folder / "3-duplicates.png"), full_page=True)
        # The similarity threshold moves; the calibrated rule is one click back.
        with page.expect_response(lambda response: "threshold=0.99" in response.url):
            page.locator("#dedup-threshold").fill("0.99")
        playwright_api.expect(page.locator("#dedup-threshold-value")).to_have_text("0.99")
        playwright_api.expect(group).to_have_count(1)   # byte copies group at any threshold
        page.click("#dedup-calibrated")
        playwright_api.expect(page.locator("#dedup-threshold-value")).to_contain_text("calibrated")
        # Not a duplicate: set aside, out of the plan, and back with undo.
        page.click("#view-duplicates section button.not-duplicate")
        playwright_api.expect(page.locator("#set-aside")).to_be_visible()
        playwright_api.expect(page.locator("#view-duplicates button.not-duplicate")).to_have_count(0)
        with page.expect_download() as download_info:
            page.click("#export-json")
        assert json.loads(Path(download_info.value.path()).read_text())["remove"] == []
        page.click("#view-duplicates button.is-duplicate")
        playwright_api.expect(page.locator("#set-aside")).to_have_count(0)
        playwright_api.expect(group.locator("figure.keep")).to_have_attribute("title", kept)

        page.click("button[data-view=outliers]")
        playwright_api.expect(page.locator("#view-outliers figure").first).to_be_visible()
        # A cluster opens whole: every member, not only the 8 nearest its centre.
        page.click("button[data-view=clusters]")
        playwright_api.expect(page.locator("#view-clusters section")).to_have_count(4)   # sqrt(25 / 2)
        page.fill("#cluster-k", "2")   # two clusters of 25 images: the larger has more than its 8 examples
        page.press("#cluster-k", "Enter")   # a number field's change: Enter or leaving it
        playwright_api.expect(page.locator("#view-clusters section")).to_have_count(2)
        largest = page.locator("#view-clusters section").first
        size = int(re.search(r"(\d+) images", largest.locator("h2").inner_text()).group(1))
        assert size > 8
        playwright_api.expect(largest.locator("figure")).to_have_count(8)
        largest.locator("button.whole").click()
        playwright_api.expect(largest.locator("figure")).to_have_count(size)
        playwright_api.expect(largest.locator("button.whole")).to_be_hidden()
        playwright_api.expect(page.locator(".error")).to_have_count(0)
        page.click("button[data-view=map]")
        playwright_api.expect(page.locator("#map-note")).to_contain_text("PCA")
        playwright_api.expect(page.locator("#legend span")).to_have_count(1)
        canvas = page.locator("#map").bounding_box()
        scale = canvas["width"] / 1000
        # Hovering a point shows that image: the canvas position of one point, from the page.
        x, y = page.evaluate("mapView.positionOf(mapView.points[3])")
        page.mouse.move(canvas["x"] + x * scale, canvas["y"] + y * scale)
        playwright_api.expect(page.locator("#tip img")).to_have_attribute("src", re.compile(r"/api/thumbnails/\d+$"))
        # The wheel zooms in around the pointer.
        page.mouse.wheel(0, -300)
        page.wait_for_function("mapView.zoom > 1")
        # Shift-drag selects the points in a box: every point, at zoom 1.
        page.evaluate("mapView.zoomAt(0.01, 0, 0)")
        canvas = page.locator("#map").bounding_box()   # the wheel may have scrolled the page
        page.keyboard.down("Shift")
        page.mouse.move(canvas["x"] + 2, canvas["y"] + 2)
        page.mouse.down()
        page.mouse.move(canvas["x"] + canvas["width"] - 2, canvas["y"] + canvas["height"] - 2, steps=5)
        page.mouse.up()
        page.keyboard.up("Shift")
        assert page.evaluate("mapView.points.length") == 25
        playwright_api.expect(page.locator("#selection figure")).to_have_count(25)
        # The selection leaves the app as a list (it could be listed, not exported).
        with page.expect_download() as download_info:
            page.click("#export-selection")
        rows = Path(download_info.value.path()).read_text().splitlines()
        assert rows[0] == "id,path,label" and len(rows) == 26
        assert {row.split(",")[1] for row in rows[1:]} == {str(p) for p in paths} | {str(copy)}
        # Reset zoom, and the keyboard: the map takes the focus with Tab; + zooms, 0 resets.
        page.locator("#map").hover()
        page.mouse.wheel(0, -300)
        page.wait_for_function("mapView.zoom > 1")
        page.click("#map-reset")
        assert page.evaluate("mapView.zoom") == 1
        tab_to(page, "#map")
        page.keyboard.press("+")
        assert page.evaluate("mapView.zoom") > 1
        page.keyboard.press("0")
        assert page.evaluate("mapView.zoom") == 1
        # 21 folders get 21 colours that differ in lightness too (one saturation and lightness
        # for all made them indistinguishable), and a legend item never splits its swatch from its name.
        colours = page.evaluate("[...Array(21).keys()].map(i => labelColour(i, 21))")
        assert len(set(colours)) == 21
        lightness = sorted(sum(int(c[i:i + 2], 16) for i in (1, 3, 5)) / 3 for c in colours)
        assert lightness[-1] - lightness[0] > 120
        assert page.evaluate("getComputedStyle(document.querySelector('#legend span')).whiteSpace") == "nowrap"
        page.screenshot(path=str(folder / "4-map.png"), full_page=True)

        page.goto(url + "/docs")   # Swagger UI from the package, no CDN
        playwright_api.expect(page.locator(".opblock-summary-path").first).to_be_visible()
        assert page.locator(".opblock").count() >= 10
        page.screenshot(path=str(folder / "5-docs.png"), full_page=True)
    for name in ("3-duplicates.png", "4-map.png", "5-docs.png"):
        assert (folder / name).stat().st_size > 5_000


def test_the_view_is_in_the_url_so_a_reload_or_a_link_keeps_it(server):
    """The URL never changed: a reload lost the view and nothing could be linked."""
    url, folder, paths = server
    with opened_browser(folder) as (browser, page):
        page.goto(url)
        page.click("button[data-view=duplicates]")
        playwright_api.expect(page.locator("#view-duplicates section")).to_have_count(1)
        page.select_option("#plan-rule", "keep-first")
        playwright_api.expect(page).to_have_url(re.compile(r"#duplicates\?plan=keep-first$"))
        page.reload()
        playwright_api.expect(page.locator("button[data-view=duplicates]")).to_have_class("active")
        playwright_api.expect(page.locator("#plan-rule")).to_have_value("keep-first")
        # The image open whole is in the URL too, and "search from it" links its search.
        page.locator("#view-duplicates figure").first.click()
        playwright_api.expect(page).to_have_url(re.compile(r"&image=\d+$"))
        page.click("#viewer-search")
        playwright_api.expect(page).to_have_url(re.compile(r"#search\?id=\d+&k=20$"))
        linked = page.url
        # A link opens the view it names: the search from an indexed image, clusters with their k.
        other = browser.new_page()
        other.goto(linked)
        playwright_api.expect(other.locator("#results figure")).to_have_count(20)
        playwright_api.expect(other.locator("#query figcaption")).to_contain_text("images/")
        other.goto(url + "/#clusters?k=2")
        playwright_api.expect(other.locator("#view-clusters section")).to_have_count(2)
        other.goto(url + "/#quality")   # the quality checks, one section each, every caption a measure
        playwright_api.expect(other.locator("#view-quality section")).to_have_count(6)
        playwright_api.expect(other.locator("#view-quality section[data-check=tiny] figcaption").first).to_contain_text(" px ")
        other.goto(url + "/#map?image=nonsense")   # a link's junk is ignored, not an error
        playwright_api.expect(other.locator("button[data-view=map]")).to_have_class("active")

