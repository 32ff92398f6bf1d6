"""Results first: a plate segmented through the page, then its page (#/jobs/<id>) with the well map,
the deep-zoom viewer (layers, contrast, outlines, a click on a cell), the measurements table and
histogram, and every result as one zip archive."""

from __future__ import annotations

import csv
import io
import time
import zipfile

import pytest

from tests.browser.conftest import (
    ARTIFACTS,
    CELL_LINE,
    enter_key,
    no_horizontal_overflow,
    open_page,
)
from tests.service.workflow import field_tiff, small_plate

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WELLS = ["A01-field1.ome.tif", "A02-field1.ome.tif", "B01-field1.ome.tif", "B03-field2.ome.tif"]


@pytest.fixture(scope="module")
def plate_job(browser, live_server, tiny_zoo) -> str:
    """A 4-well plate segmented through the page; -> the job id once it has succeeded."""
    context, page = open_page(browser, live_server)
    try:
        enter_key(page, live_server.key)
        fields = small_plate(len(WELLS), size=128, n_channels=2, seed=17)
        page.set_input_files(
            "#seg-files",
            files=[
                {"name": name, "mimeType": "image/tiff", "buffer": field_tiff(f)}
                for name, f in zip(WELLS, fields, strict=True)
            ],
        )
        page.wait_for_selector("#seg-file-info:has-text('2 channel(s)')")
        assert page.locator("#seg-file-list tbody tr").count() == len(WELLS)
        assert page.locator("#seg-file-list td.job-error").count() == 0
        # Each channel of the first file as a thumbnail, decoded in the browser before any upload.
        page.locator("#seg-channels canvas.thumb").nth(1).wait_for()
        assert page.locator("#seg-channels canvas.thumb").count() == 2
        page.select_option("#seg-cell-line", CELL_LINE)
        page.fill("#seg-plate", "P-17")
        # Before submitting, each channel shows the model version it will use and that model's F1.
        page.locator("#seg-channels td.plan", has_text="F1").first.wait_for()
        assert page.locator("#seg-channels td.plan", has_text="nuclei: v").count() == 2
        page.click("#seg-submit")
        page.wait_for_function("() => /^#\\/jobs\\/[0-9a-f-]{36}$/.test(location.hash)")
        job_id = page.evaluate("() => location.hash.split('/').pop()")
        assert not page.console_errors.unexpected(), page.console_errors
    finally:
        context.close()
    done = live_server.client().wait(job_id, timeout=180, poll=0.5)
    assert done["status"] == "succeeded", done["error"]
    return job_id


def test_the_job_page_is_a_link_with_a_plate_map(browser, live_server, plate_job):
    context, page = open_page(browser, live_server, width=1600, height=1000)
    try:
        enter_key(page, live_server.key)
        page.goto(f"/#/jobs/{plate_job}")  # a link someone sent: opens the job's page directly
        page.locator("#job-detail h3 .badge", has_text="succeeded").wait_for()
        assert f"#/jobs/{plate_job}" in page.locator("#job-detail a.permalink").get_attribute("href")
        row = page.locator(f"#jobs-body tr[data-job='{plate_job}']")
        assert "plate P-17" in row.inner_text() and "4 field(s)" in row.inner_text()
        assert "took" in page.inner_text("#job-detail .job-timing")

        wells = page.locator("#plate-box svg.plate .well-group")
        wells.first.wait_for()
        assert wells.count() == len(WELLS)
        assert page.locator("#plate-box svg.plate rect.well.empty").count() == 96
        counts = {w.split("-")[0]: None for w in WELLS}
        for i in range(wells.count()):
            label = wells.nth(i).get_attribute("aria-label")
            counts[wells.nth(i).get_attribute("data-well")] = label
        assert all(v and "well" in v for v in counts.values()), counts
        # Colour by any measurement: the medians per well.
        options = page.locator("#plate-box select.plate-measure option").all_inner_texts()
        assert "nuclei count" in options and any(o.startswith("median cell area") for o in options), options
        page.select_option(
            "#plate-box select.plate-measure", label=next(o for o in options if o.startswith("median cell area"))
        )
        assert "median cell area" in page.locator("#plate-box svg.plate").get_attribute("aria-label")
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#plate-box").screenshot(path=str(ARTIFACTS / "web-plate-map.png"))
        # A well opens its field in the viewer.
        page.locator("#plate-box .well-group[data-well='B03']").click()
        page.locator("#field-view-title", has_text="B03-2").wait_for()
        assert not page.console_errors.unexpected()
    finally:
        context.close()


def _first_nucleus(live_server, job_id: str, field: str) -> dict:
    response = live_server.client().http.get(f"/api/v1/jobs/{job_id}/results/{field}/measurements.csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    nuclei = [r for r in rows if r["object"] == "nucleus"]
    assert nuclei, "the tiny zoo found no nucleus"
    return max(nuclei, key=lambda r: float(r["area"]))


@pytest.mark.parametrize("width", [1600, 400])
def test_the_viewer_zooms_toggles_and_tells_about_a_cell(browser, live_server, plate_job, width):
    context, page = open_page(browser, live_server, width=width, height=1000)
    try:
        enter_key(page, live_server.key)
        page.goto(f"/#/jobs/{plate_job}")
        page.wait_for_selector("#viewer[data-ready='true']", timeout=30_000)
        field = page.inner_text("#field-view-title").removeprefix("Field ").strip()
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#field-view").screenshot(path=str(ARTIFACTS / f"web-viewer-default-{width}px.png"))
        assert page.locator("#viewer").get_attribute("data-layers") == "4"  # 2 channels + 2 outline layers
        assert page.locator("#viewer-box input[data-channel]").count() == 2
        assert page.locator("#viewer-box input[data-outline]").count() == 2
        legend = page.inner_text("#viewer-box .legend-text")
        assert "nuclei" in legend and "cells" in legend

        # Zoom in (deep zoom on the full-resolution field), then back to the whole field.
        zoom = "() => document.getElementById('viewer').osd.viewport.getZoom()"
        before = page.evaluate(zoom)
        page.click("#viewer-box [data-zoom='in']")
        page.wait_for_function(f"z => ({zoom.removeprefix('() => ')}) > z * 1.2", arg=before)
        page.click("#viewer-box [data-zoom='home']")

        # Layers: a channel off, cell outlines fainter, contrast of channel 1 changed.
        page.uncheck("#viewer-box input[data-channel='1']")
        page.fill("#viewer-box input[data-opacity='cells']", "0.3")
        page.dispatch_event("#viewer-box input[data-opacity='cells']", "input")
        opacities = page.evaluate(
            "() => { const w = document.getElementById('viewer').osd.world;"
            " return [...Array(w.getItemCount()).keys()].map(i => w.getItemAt(i).getOpacity()); }"
        )
        assert opacities[1] == 0 and abs(opacities[2] - 0.3) < 1e-6, opacities
        # Nucleus outlines off and on again: their layer (drawn last) hides and comes back at its opacity.
        page.uncheck("#viewer-box input[data-outline='nuclei']")
        assert page.evaluate("() => document.getElementById('viewer').osd.world.getItemAt(3).getOpacity()") == 0
        page.check("#viewer-box input[data-outline='nuclei']")
        assert page.evaluate("() => document.getElementById('viewer').osd.world.getItemAt(3).getOpacity()") > 0.5
        with page.expect_response(lambda r: "/channel/0.png?low=" in r.url) as answer:
            page.fill("#viewer-box input.contrast-high >> nth=0", "40000")
            page.dispatch_event("#viewer-box input.contrast-high >> nth=0", "change")
        assert answer.value.status == 200

        # Click the largest nucleus: its measurements appear beside the image.
        nucleus = _first_nucleus(live_server, plate_job, field)
        x, y = float(nucleus["centroid_x"]) + 0.5, float(nucleus["centroid_y"]) + 0.5
        page.locator("#viewer").scroll_into_view_if_needed()
        where = page.evaluate(
            """([x, y]) => { const v = document.getElementById('viewer').osd;
          const p = v.world.getItemAt(0).imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
          const r = v.element.getBoundingClientRect(); return [r.left + p.x, r.top + p.y]; }""",
            [x, y],
        )
        page.mouse.click(*where)
        picked = page.locator("#viewer-box .picked table.picked-table")
        picked.wait_for()
        assert f"nucleus {nucleus['label']}" in page.inner_text("#viewer-box .picked")
        assert "area" in picked.inner_text()
        overflow = no_horizontal_overflow(page)
        assert overflow <= 0, overflow.culprits
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#field-view").screenshot(path=str(ARTIFACTS / f"web-viewer-{width}px.png"))
        assert not page.console_errors.unexpected()
    finally:
        context.close()


def test_measurements_sort_and_histogram_and_download_all(page, live_server, plate_job):
    enter_key(page, live_server.key)
    page.goto(f"/#/jobs/{plate_job}")
    table = page.locator("#measurements-box table.measurements-table")
    table.locator("tbody tr").first.wait_for()
    assert page.locator("#measurements-box svg.histogram rect.bar").count() >= 1
    # Sort by area, largest first (two clicks), and check the order on screen.
    header = page.locator("#measurements-box button.sort[data-column='area']")
    header.click()
    header.click()
    assert page.locator("#measurements-box th[aria-sort='descending']").inner_text().startswith("area")
    columns = table.locator("thead th").all_inner_texts()
    index = next(i for i, c in enumerate(columns) if c.startswith("area"))
    areas = [float(t) for t in table.locator(f"tbody tr td:nth-child({index + 1})").all_inner_texts()]
    assert areas == sorted(areas, reverse=True) and len(areas) >= 1
    page.select_option("#measurements-box select.measure-column", "area")
    assert "area" in page.locator("#measurements-box svg.histogram").get_attribute("aria-label")

    with page.expect_download() as info:
        page.click("#download-all")
    path = info.value.path()
    assert info.value.suggested_filename.endswith(".zip")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        assert archive.testzip() is None
    expected = {r["name"] for r in live_server.client().job(plate_job)["results"]}
    assert names == expected and "provenance.json" in names


def test_jobs_filter_and_page(page, live_server, plate_job):
    enter_key(page, live_server.key)
    page.click("nav [data-tab='jobs']")
    page.locator("#jobs-body tr.job-row").first.wait_for()
    page.select_option("#jobs-kind", "segment")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kinds = page.locator("#jobs-body tr.job-row .job-what > div:first-child").all_inner_texts()
        if kinds and set(kinds) == {"segmentation"}:
            break
        page.wait_for_timeout(200)
    assert kinds and set(kinds) == {"segmentation"}, kinds
    total = live_server.client().get("/api/v1/jobs?kind=segment&limit=1")["total"]
    assert page.inner_text("#jobs-page").endswith(f"of {total}")
    page.select_option("#jobs-status", "failed")
    page.locator("#jobs-body td.muted", has_text="No job matches").wait_for()


def test_a_384_well_plate_marks_its_failed_field(browser, live_server, tiny_zoo):
    """Wells past H12 make a 384-well map; a field that failed is crossed out and says why."""
    from app.storage import BlobStore

    api = live_server.client()
    wells = ["A01", "H13", "P24"]
    # A long test job keeps the worker busy, so the plate waits in the queue while one of its
    # stored images is removed: that field fails when the worker reaches it, the others succeed.
    blocker = api.submit("noop", {"steps": 600, "step_seconds": 0.1})
    try:
        deadline = time.monotonic() + 60
        while api.job(blocker["id"])["status"] != "running":
            assert time.monotonic() < deadline, "the blocking job did not start"
            time.sleep(0.2)
        fields = small_plate(len(wells), size=128, n_channels=2, seed=31)
        request = {
            "cell_line": CELL_LINE,
            "channels": tiny_zoo.channels,
            "objects": ["nuclei"],
            "plate": "P-384",
            "fields": [{"well": w, "field": 1} for w in wells],
        }
        seg = api.submit_segment(request, [(f"{w}.tif", field_tiff(f)) for w, f in zip(wells, fields, strict=True)])
        lost = api.job(seg["id"])["params"]["fields"][1]["image_sha256"]
        BlobStore(live_server.settings.blob_dir).path_for(lost).unlink()
    finally:
        api.http.post(f"/api/v1/jobs/{blocker['id']}/cancel")
    done = api.wait(seg["id"], timeout=180, poll=0.5)
    assert done["status"] == "succeeded" and done["summary"]["fields_failed"] == 1, done["summary"]

    context, page = open_page(browser, live_server, width=1600, height=1000)
    try:
        enter_key(page, live_server.key)
        page.goto(f"/#/jobs/{seg['id']}")
        plate = page.locator("#plate-box svg.plate")
        plate.locator(".well-group").nth(len(wells) - 1).wait_for()
        assert plate.get_attribute("aria-label").startswith("384-well")
        assert plate.locator("rect.well.empty").count() == 384
        failed = plate.locator(".well-group.failed")
        assert failed.count() == 1 and failed.get_attribute("data-well") == "H13"
        assert failed.locator("path.failed-mark").count() == 1
        assert "1 field(s) failed" in failed.get_attribute("aria-label")
        assert "missing from the data directory" in failed.locator("title").text_content()
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#plate-box").screenshot(path=str(ARTIFACTS / "web-plate-map-384.png"))
        # A well is reachable by keyboard: Enter opens its field in the viewer.
        page.locator("#plate-box .well-group[data-well='P24']").focus()
        page.keyboard.press("Enter")
        page.locator("#field-view-title", has_text="P24").wait_for()
        assert not page.console_errors.unexpected(), page.console_errors.unexpected()
    finally:
        context.close()
