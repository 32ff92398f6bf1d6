"""A lab starting from an empty service, only through the web page: register the cell line and the
reporters, create a dataset and upload annotated images, fine-tune two versions, evaluate and compare
them, promote the better one (and see the gate refuse the worse), then segment a plate with it
leaving out a channel that has no model, and look at the plate map. At 1600 px, then every tab at
400 px; no console errors."""

from __future__ import annotations

import time

import pytest

from app.science.image_files import labels_to_tiff_bytes
from tests.browser.conftest import (
    ARTIFACTS,
    enter_key,
    no_horizontal_overflow,
    open_page,
    register_base,
    require_chromium,
    serve,
)
from tests.service.workflow import field_tiff, small_plate

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LINE = "HeLa-lab"
SPLITS = ["train", "train", "train", "val", "test"]


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    require_chromium()
    with serve(tmp_path_factory.mktemp("lab")) as server:
        yield server


def _choose_plate_files(page, names: list[str], fields) -> None:
    page.set_input_files(
        "#seg-files",
        files=[
            {"name": n, "mimeType": "image/tiff", "buffer": field_tiff(f)} for n, f in zip(names, fields, strict=True)
        ],
    )
    page.wait_for_selector("#seg-file-info:has-text('2 channel(s)')")


def _wait_job_page(page, before: str, timeout_s: float = 240) -> str:
    """Wait on the job page that the page opened after a submit until the job ends; -> its status."""
    page.wait_for_function(
        "old => /^#\\/jobs\\/[0-9a-f-]{36}$/.test(location.hash) && location.hash !== old", arg=before
    )
    job_id = page.evaluate("() => location.hash.split('/').pop()")
    page.locator("#job-detail h3 code", has_text=job_id[:8]).wait_for()
    badge = page.locator("#job-detail h3 .badge")
    badge.wait_for()
    deadline = time.monotonic() + timeout_s
    while badge.inner_text() not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, page.inner_text("#job-detail")
        page.wait_for_timeout(300)
    return badge.inner_text()


def _fine_tune(page, reporter: str, epochs: int, base: str = "", learning_rate: str = "") -> None:
    page.click("nav [data-tab='train']")
    page.locator(f"#ft-base option[value='{base}']").wait_for(state="attached")
    page.select_option("#ft-reporter", reporter)
    page.select_option("#ft-object", "nuclei")
    page.select_option("#ft-base", base)  # "": the shipped base
    page.fill("#ft-max-epochs", str(epochs))
    if page.locator("#finetune-form details").get_attribute("open") is None:
        page.click("#finetune-form summary")
    page.fill("#ft-min-epochs", "0")
    page.fill("#ft-batch-size", "4")
    page.fill("#ft-bsize", "64")
    page.fill("#ft-learning-rate", learning_rate)
    before = page.evaluate("() => location.hash")
    page.click("#ft-submit")
    assert _wait_job_page(page, before) == "succeeded", page.inner_text("#job-detail")


def test_a_lab_from_an_empty_service_to_a_segmented_plate(browser, empty_server):
    context, page = open_page(browser, empty_server, width=1600, height=1000)
    page.console_errors.expect("status of 409")  # the gate refusing the worse version, on purpose
    try:
        enter_key(page, empty_server.key)
        assert "admin" in page.inner_text("#key-role")

        # 1. Cell line and reporters.
        page.click("nav [data-tab='zoo']")
        page.locator("#cell-lines-body", has_text="No cell lines yet").wait_for()
        page.fill("#cl-name", LINE)
        page.fill("#cl-species", "human")
        page.click("#cl-submit")
        page.locator("#cell-lines-body", has_text=LINE).wait_for()
        fields = small_plate(len(SPLITS) + 3, size=128, n_channels=2, seed=23)
        channels = fields[0].channel_names  # ["cyto", "nuclear"]
        for name in channels:
            page.fill("#rep-name", name)
            page.fill("#rep-localisation", name)
            page.click("#rep-submit")
            page.locator("#reporters-body td", has_text=name).first.wait_for()

        # 2. A dataset and five annotated images (3 training, 1 validation, 1 test).
        page.click("nav [data-tab='train']")
        page.fill("#ds-name", "lab-set")
        page.select_option("#ds-cell-line", LINE)
        page.fill("#ds-channels", ", ".join(channels))
        page.click("#ds-submit")
        page.locator("#datasets-list", has_text="lab-set").wait_for()
        for i, split in enumerate(SPLITS):
            field = fields[i]
            page.set_input_files(
                "#up-image", files=[{"name": f"img{i}.tif", "mimeType": "image/tiff", "buffer": field_tiff(field)}]
            )
            page.set_input_files(
                "#up-nuclei",
                files=[{"name": f"nuc{i}.tif", "mimeType": "image/tiff", "buffer": labels_to_tiff_bytes(field.nuclei)}],
            )
            if i == 0:  # the first image with its cell mask as well: image + nuclei + cells
                page.set_input_files(
                    "#up-cells",
                    files=[
                        {"name": "cells0.tif", "mimeType": "image/tiff", "buffer": labels_to_tiff_bytes(field.cells)}
                    ],
                )
            page.select_option("#up-split", split)
            page.click("#up-submit")
            page.locator("#notice-title", has_text="Image added").wait_for()
            page.locator("#datasets-list", has_text=f"{SPLITS[: i + 1].count(split)} {split}").wait_for()
            masks = "nuclei + cells" if i == 0 else "nuclei"
            assert page.inner_text("#notice-detail").endswith(f"labelled for {masks}"), page.inner_text("#notice")
        listed = page.inner_text("#datasets-list")
        assert "1 val" in listed and "1 test" in listed
        assert "labelled for nuclei: 5, for cells: 1" in listed, listed
        dataset = next(d for d in empty_server.client().get("/api/v1/datasets") if d["name"] == "lab-set")
        with_cells = [image for image in dataset["images"] if image["cells_sha256"]]
        assert [(image["filename"], image["split"]) for image in with_cells] == [("img0.tif", "train")]
        assert all(image["nuclei_sha256"] for image in dataset["images"])

        # 3. Two versions of the nuclear reporter's nuclei model.
        # The first from the shipped (pretrained) base; the second from a randomly initialised base that an
        # admin uploaded through the API: it finds next to nothing, so the gate has a worse one to refuse.
        _fine_tune(page, "nuclear", epochs=2)
        register_base(empty_server.client(), "untrained-base")
        _fine_tune(page, "nuclear", epochs=1, base="untrained-base")

        # 4. Compare them side by side, evaluate both on the test split, promote the better one.
        page.click("nav [data-tab='zoo']")
        rows = page.locator("#versions-body tr.version-row")
        rows.nth(1).wait_for()
        assert rows.count() == 2
        for i in range(2):
            rows.nth(i).locator("input.compare-tick").check()
        page.locator("#compare-table thead th", has_text="#").nth(1).wait_for()
        assert "Test F1" in page.inner_text("#compare-table")
        page.select_option("#evaluate-dataset", index=0)
        page.click("#evaluate-selected")
        page.locator("#notice-title", has_text="Evaluation started").wait_for()
        api = empty_server.client()
        evaluations = [j for j in api.get("/api/v1/jobs?kind=evaluate")["items"]]
        assert len(evaluations) == 2
        for job in evaluations:
            assert api.wait(job["id"], timeout=180, poll=0.5)["status"] == "succeeded"
        versions = {v["id"]: v for v in api.get("/api/v1/models")}
        scores = {}
        for vid in versions:
            evals = [j for j in evaluations if j["params"].get("model_version_id") == vid]
            scores[vid] = api.job(evals[0]["id"])["summary"]["metrics"]["f1"] if evals else None
        better, worse = sorted(versions, key=lambda vid: scores[vid] or 0.0, reverse=True)
        page.click("#zoo-refresh")
        page.locator("#compare-panel").wait_for()
        page.select_option("#promote-version", str(better))
        page.click("#promote-submit")
        page.locator("#promote-result", has_text="now points").wait_for()
        row = page.locator(f"#versions-body tr[data-version='{better}']")
        deadline = time.monotonic() + 15
        while "production" not in row.inner_text() and time.monotonic() < deadline:
            page.wait_for_timeout(200)
        assert "production" in row.inner_text(), (
            page.inner_text("#promote-result"),
            page.inner_text("#versions-body"),
            page.console_errors,
            scores,
        )
        # The gate refuses a worse model, and the page says why (both F1s on the same test set).
        page.select_option("#promote-version", str(worse))
        page.click("#promote-submit")
        assert (scores[worse] or 0.0) < (scores[better] or 0.0), scores
        page.locator("#promote-result", has_text="Refused").wait_for()
        assert "worse than" in page.inner_text("#promote-result")
        assert f"{scores[better]:.3f}" in page.inner_text("#promote-result")
        assert api.get("/api/v1/aliases")[0]["version_id"] == better
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#compare-panel").screenshot(path=str(ARTIFACTS / "web-lab-compare.png"))

        # 5. Segment a 3-well plate with it; the cytoplasmic channel has no model and is left out.
        page.click("nav [data-tab='segment']")
        plate = fields[len(SPLITS) :]
        names = [f"{w}-field1.ome.tif" for w in ("C04", "C05", "D04")]
        _choose_plate_files(page, names, plate)
        page.select_option("#seg-cell-line", LINE)
        page.uncheck("#segment-form input[value='cells']")  # only nuclei were annotated and trained
        page.uncheck("#seg-zoo-channels")
        page.uncheck(f"input[data-fuse='{channels.index('cyto')}']")
        page.locator("#seg-channels td.plan", has_text="nuclei: v").first.wait_for()
        plan = page.inner_text(f"#seg-channels td.plan[data-plan='{channels.index('nuclear')}']")
        assert f"#{better}" in plan and "alias production" in plan
        page.fill("#seg-plate", "lab-plate-1")
        before = page.evaluate("() => location.hash")
        page.click("#seg-submit")
        assert _wait_job_page(page, before) == "succeeded", page.inner_text("#job-detail")
        page.locator("#plate-box svg.plate .well-group").nth(2).wait_for()
        page.wait_for_selector("#viewer[data-ready='true']", timeout=30_000)
        page.locator("#plate-box").screenshot(path=str(ARTIFACTS / "web-lab-plate-map.png"))
        page.screenshot(path=str(ARTIFACTS / "web-lab-job-1600px.png"), full_page=True)
        assert not page.console_errors.unexpected(), page.console_errors.unexpected()
        job_hash = page.evaluate("() => location.hash")

        # 5b. The same plate zero-shot: the shipped base model, its size model estimating the diameter.
        page.click("nav [data-tab='segment']")
        _choose_plate_files(page, names, plate)
        page.select_option("#seg-cell-line", LINE)
        page.select_option("#seg-model", "base")
        page.set_checked("#segment-form input[value='cells']", False)
        page.set_checked("#seg-zoo-channels", False)
        page.set_checked(f"input[data-fuse='{channels.index('cyto')}']", False)
        before = page.evaluate("() => location.hash")
        page.click("#seg-submit")
        assert _wait_job_page(page, before) == "succeeded", page.inner_text("#job-detail")
        zero_shot = api.job(page.evaluate("() => location.hash.split('/').pop()"))
        used = zero_shot["summary"]["fields"][0]["settings"]["nuclei"]
        assert used["diameter_source"] == "plate estimate" and used["diameter"] > 0
        assert zero_shot["params"]["plan"]["nuclei"]["base_models"]
        assert not page.console_errors.unexpected(), page.console_errors.unexpected()
    finally:
        context.close()

    # 6. The same page at 400 px: nothing scrolls sideways, on any tab or on the job's page.
    context, page = open_page(browser, empty_server, width=400, height=900)
    try:
        enter_key(page, empty_server.key)
        for tab in ("segment", "zoo", "train", "jobs"):
            page.click(f"nav [data-tab='{tab}']")
            page.wait_for_timeout(500)
            overflow = no_horizontal_overflow(page)
            assert overflow <= 0, f"{tab}: {overflow.culprits}"
        page.goto("/" + job_hash)
        page.wait_for_selector("#viewer[data-ready='true']", timeout=30_000)
        overflow = no_horizontal_overflow(page)
        assert overflow <= 0, f"job page: {overflow.culprits}"
        page.screenshot(path=str(ARTIFACTS / "web-lab-job-400px.png"), full_page=True)
        assert not page.console_errors.unexpected(), page.console_errors.unexpected()
    finally:
        context.close()
