"""Preprocessing through the page: upload a measured flat-field (a wrong channel count is refused
with the server's 422 in words), fine-tune with a per-plate recipe chosen on the form and see the
version's recipe and training profile in the zoo, then a segmentation's job page shows per channel
the recipe, its source and the flat-field images. At 1600 px and 400 px; no console errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from app.science.image_files import image_to_tiff_bytes
from tests.browser.conftest import (
    ARTIFACTS,
    CELL_LINE,
    SPLITS,
    enter_key,
    no_horizontal_overflow,
    open_page,
    require_chromium,
    serve,
)
from tests.service.workflow import field_tiff, small_plate, upload_dataset

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A server of its own: the fine-tune and segmentation here would change the job lists and the zoo
    that the tests on the shared server count."""
    require_chromium()
    with serve(tmp_path_factory.mktemp("preprocessing")) as server:
        yield server


def _flatfield(planes: int, size: int = 128) -> bytes:
    yy, xx = np.mgrid[:size, :size]
    r2 = ((yy - size / 2) / size) ** 2 + ((xx - size / 2) / size) ** 2
    flat = (1.0 - 0.5 * r2 / r2.max()).astype(np.float32)
    return image_to_tiff_bytes(np.stack([flat] * planes) if planes > 1 else flat)


def _loaded(page, selector: str) -> list[int]:
    """naturalWidth of each matching <img> once every one has loaded (0 = a broken image)."""
    page.wait_for_function(
        "s => { const i = [...document.querySelectorAll(s)]; return i.length && i.every((x) => x.complete && x.src); }",
        arg=selector,
    )
    return page.evaluate("s => [...document.querySelectorAll(s)].map((x) => x.naturalWidth)", selector)


def _upload_profile(page, name: str, channels: str, tiff: bytes) -> None:
    page.fill("#pf-name", name)
    page.fill("#pf-channels", channels)
    page.set_input_files("#pf-file", files=[{"name": "flat.tif", "mimeType": "image/tiff", "buffer": tiff}])
    page.click("#pf-submit")


def test_recipes_and_profiles_from_form_to_job_page(browser, own_server):
    live_server = own_server
    api = live_server.client()
    fields = small_plate(len(SPLITS), size=128, n_channels=2)
    channels = list(fields[0].channel_names)
    dataset = upload_dataset(api, fields, splits=SPLITS)
    context, page = open_page(browser, live_server, width=1600, height=1000)
    page.console_errors.expect("status of 422")  # the refused upload and fine-tune, on purpose
    try:
        enter_key(page, live_server.key)

        # 1. Profiles panel: a 1-plane flat-field named with two channels is refused in words.
        page.click("nav [data-tab='zoo']")
        page.locator("#profile-form").wait_for()
        _upload_profile(page, "slide", "a, b", _flatfield(1))
        page.wait_for_selector("#notice.error")
        assert "1 plane(s)" in page.inner_text("#notice-detail"), page.inner_text("#notice")
        _upload_profile(page, "dye slide", ", ".join(channels), _flatfield(2))
        page.wait_for_selector("#notice.info:has-text('Profile stored')")
        card = page.locator(".profile-card", has_text="dye slide")
        card.locator("figcaption").nth(1).wait_for()
        assert card.locator("figcaption").all_inner_texts() == channels
        assert all(w == 128 for w in _loaded(page, ".profile-card img.profile-preview")), "a preview did not load"
        _upload_profile(page, "other scope", "GFP", _flatfield(1))
        page.locator(".profile-card", has_text="other scope").locator("figcaption").wait_for()

        # 2. Fine-tune with a per-plate recipe chosen on the form.
        page.click("nav [data-tab='train']")
        page.locator(f"#ft-dataset option[value='{dataset['id']}']").wait_for(state="attached")
        page.select_option("#ft-dataset", str(dataset["id"]))
        page.select_option("#ft-reporter", channels[0])
        page.select_option("#ft-object", "nuclei")
        assert page.is_disabled("#ft-darkfield") and page.is_disabled("#ft-profile")
        page.check("input[name='ft-illumination'][value='profile']")
        assert page.is_enabled("#ft-profile") and "dye slide" in page.inner_text("#ft-profile")
        # A profile without the reporter's channel: the server's problem detail, as the page shows any.
        other = page.locator("#ft-profile option", has_text="other scope").get_attribute("value")
        page.select_option("#ft-profile", other)
        page.click("#ft-submit")
        page.wait_for_selector("#notice.error")
        assert f"has no channel '{channels[0]}'" in page.inner_text("#notice-detail"), page.inner_text("#notice")
        page.check("input[name='ft-illumination'][value='per-plate']")
        page.check("input[name='ft-normalization'][value='per-plate']")
        assert "BaSiC" in page.inner_text("#ft-preprocessing")
        page.fill("#ft-max-epochs", "2")
        page.click("#finetune-form summary")
        page.fill("#ft-min-epochs", "0")
        page.fill("#ft-batch-size", "4")
        page.fill("#ft-bsize", "64")
        page.click("#ft-submit")
        page.wait_for_function("() => /^#\\/jobs\\/[0-9a-f-]{36}$/.test(location.hash)")
        job_id = page.evaluate("() => location.hash.split('/').pop()")
        assert api.get(f"/api/v1/jobs/{job_id}")["params"]["params"]["preprocessing"]["illumination"] == "per-plate"
        done = api.wait(job_id, timeout=300, poll=0.5)
        assert done["status"] == "succeeded", done["error"]
        version_id = done["summary"]["model_version_id"]

        # 3. The zoo tells the version's recipe in words and links its training profile.
        page.click("nav [data-tab='zoo']")
        page.locator(f".version-row[data-version='{version_id}']").click()
        recipe = page.locator("#version-recipe")
        recipe.locator(".recipe", has_text="per-plate shading correction (BaSiC)").wait_for()
        assert "per-plate percentiles" in recipe.inner_text()
        card = api.get(f"/api/v1/models/{version_id}")["card"]["data"]["preprocessing"]
        assert "(estimated)" in recipe.inner_text()
        link = recipe.locator("a.training-profile")
        assert link.get_attribute("data-profile") == str(card["illumination_profile"]["id"])
        profile_id = link.get_attribute("data-profile")
        link.click()
        assert "selected" in page.locator(f"#profile-{profile_id}").get_attribute("class")

        # 4. A segmentation with the uploaded flat-field: its job page shows the profile per channel.
        profile = next(p for p in api.get("/api/v1/illumination-profiles") if p["name"] == "dye slide")
        fields = small_plate(2, size=128, n_channels=2, seed=23)
        # The one model here (reporter channels[0], nuclei) segments with the uploaded flat-field.
        request = {
            "cell_line": CELL_LINE,
            "channels": channels,
            "objects": ["nuclei"],
            "use_channels": channels[:1],
            "fields": [{"well": "A01", "field": i} for i in range(2)],
            "params": {"preprocessing": {"illumination": "profile", "profile_id": profile["id"]}},
        }
        seg = api.submit_segment(request, [(f"f{i}.tif", field_tiff(f)) for i, f in enumerate(fields)])
        done = api.wait(seg["id"], timeout=240, poll=0.5)
        assert done["status"] == "succeeded", done["error"]
        page.goto(f"/#/jobs/{seg['id']}")
        section = page.locator("#job-preprocessing")
        section.locator("img.profile-preview").first.wait_for()
        assert all(w == 128 for w in _loaded(page, "#job-preprocessing img.profile-preview"))
        captions = section.locator("figcaption").all_inner_texts()
        assert captions == [f"{channels[0]} · profile #{profile['id']} (uploaded)"], captions
        assert section.locator("td.profile-ref").all_inner_texts() == [f"#{profile['id']} (uploaded)"]
        assert section.locator("td.recipe-source").all_inner_texts() == ["request override"]
        assert "stored profile" in section.locator("td.recipe").first.inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        section.screenshot(path=str(ARTIFACTS / "job-preprocessing-1600.png"))
        assert no_horizontal_overflow(page) == 0

        # 5. At 400 px: nothing to scroll sideways on the job page, the zoo or the form.
        page.set_viewport_size({"width": 400, "height": 900})
        time.sleep(0.3)
        section.screenshot(path=str(ARTIFACTS / "job-preprocessing-400.png"))
        overflow = no_horizontal_overflow(page)
        assert overflow == 0, overflow.culprits
        # The flat-fields sit below the table (which scrolls by itself), inside the narrow screen.
        rights = page.evaluate(
            "() => [...document.querySelectorAll('#job-preprocessing img')].map((i) => i.getBoundingClientRect().right)"
        )
        assert len(rights) == 1 and max(rights) <= 400, rights
        for tab in ("zoo", "train"):
            page.click(f"nav [data-tab='{tab}']")
            page.wait_for_timeout(300)
            overflow = no_horizontal_overflow(page)
            assert overflow == 0, (tab, overflow.culprits)
        assert not page.console_errors.unexpected(), page.console_errors.unexpected()
    finally:
        context.close()
