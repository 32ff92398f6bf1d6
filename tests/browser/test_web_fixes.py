"""The web page's broken and rough spots from issue 13, each driven in a real Chromium against a real
server and worker: each test failed on the page before its fix."""

from __future__ import annotations

import io
import re
import time

import httpx
import numpy as np
import pytest
import tifffile

from tests.browser.conftest import (
    ARTIFACTS,
    CELL_LINE,
    SHIPPED_BASE,
    enter_key,
    make_key,
    no_horizontal_overflow,
    open_page,
)
from tests.service.workflow import field_tiff, small_plate

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _jobs_total(live_server) -> int:
    return live_server.client().get("/api/v1/jobs?limit=1")["total"]


def _long_noop(live_server, steps: int = 400) -> dict:
    return live_server.client().submit("noop", {"steps": steps, "step_seconds": 0.1})


def _wait_running(live_server, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while live_server.client().job(job_id)["status"] != "running":
        assert time.monotonic() < deadline, "the noop job did not start"
        time.sleep(0.2)


def _cancel(live_server, job_id: str) -> None:
    live_server.client().http.post(f"/api/v1/jobs/{job_id}/cancel")


def test_start_from_offers_every_zoo_version(page, live_server, tiny_zoo):
    enter_key(page, live_server.key)
    page.click("nav [data-tab='train']")
    options = page.locator("#ft-base option")
    page.wait_for_function(
        "n => document.querySelectorAll('#ft-base option').length >= n", arg=1 + len(tiny_zoo.version_ids)
    )
    texts = options.all_inner_texts()
    values = [options.nth(i).get_attribute("value") for i in range(options.count())]
    assert not any("[object" in t for t in texts), texts
    for version_id in tiny_zoo.version_ids:
        assert f"version:{version_id}" in values
    assert SHIPPED_BASE in values  # the shipped base model, by name


def test_an_invalid_value_in_the_folded_panel_is_shown(page, live_server, tiny_zoo):
    enter_key(page, live_server.key)
    field = small_plate(1, size=64, n_channels=2, seed=5)[0]
    page.set_input_files(
        "#seg-files", files=[{"name": "A01-field1.ome.tif", "mimeType": "image/tiff", "buffer": field_tiff(field)}]
    )
    page.wait_for_selector("#seg-file-info:has-text('2 channel(s)')")
    page.select_option("#seg-cell-line", CELL_LINE)
    # The alias is a list (a misspelt one would silently mean "the newest models").
    assert page.evaluate("() => document.getElementById('seg-alias').tagName") == "SELECT"
    assert page.input_value("#seg-alias") == "production"
    assert page.locator("#seg-advanced").get_attribute("open") is None
    page.evaluate("() => { document.getElementById('seg-diameter').value = '0.5'; }")
    before = _jobs_total(live_server)
    page.click("#seg-submit")
    page.locator("#notice.error").wait_for()
    assert "Diameter" in page.inner_text("#notice")
    assert page.locator("#seg-advanced").get_attribute("open") is not None
    assert page.evaluate("() => document.activeElement.id") == "seg-diameter"
    assert _jobs_total(live_server) == before


def test_polling_says_when_the_server_is_gone_and_backs_off(page, live_server, tiny_zoo):
    page.console_errors.expect("ERR_FAILED", "ERR_INTERNET_DISCONNECTED")
    job = _long_noop(live_server)
    try:
        enter_key(page, live_server.key)
        page.click("nav [data-tab='jobs']")
        row = page.locator(f"#jobs-body tr[data-job='{job['id']}']")
        row.locator("button.cancel").wait_for()
        attempts: list[float] = []

        def refuse(route):
            attempts.append(time.monotonic())
            route.abort("internetdisconnected")

        page.route("**/api/v1/**", refuse)
        page.wait_for_selector("#conn-state:has-text('server unreachable')")
        assert page.locator("button.cancel:visible").count() == 0  # nothing to do while the server is away
        first = len(attempts)
        page.wait_for_timeout(9000)
        retries = len(attempts) - first
        # Polling every 1.5 s would make 6 tries in 9 s; backing off (3, 6, 12 s ...) makes at most 3.
        assert 1 <= retries <= 3, retries
        page.unroute("**/api/v1/**")
        page.wait_for_selector("#conn-state:has-text('connected')", timeout=40_000)
        row.locator("button.cancel").wait_for()
    finally:
        _cancel(live_server, job["id"])


def test_polls_leave_the_focus_where_it_is(page, live_server, tiny_zoo):
    job = _long_noop(live_server, steps=100)
    try:
        _wait_running(live_server, job["id"])
        enter_key(page, live_server.key)
        page.click("nav [data-tab='jobs']")
        button = page.locator(f"#jobs-body tr[data-job='{job['id']}'] button.cancel")
        button.wait_for()
        button.focus()
        page.evaluate("() => { document.activeElement.dataset.marked = 'yes'; }")
        bar = page.locator(f"#jobs-body tr[data-job='{job['id']}'] .progress")
        start = bar.get_attribute("aria-valuenow")
        page.wait_for_function(
            "([sel, v]) => document.querySelector(sel).getAttribute('aria-valuenow') !== v",
            arg=[f"#jobs-body tr[data-job='{job['id']}'] .progress", start],
            timeout=20_000,
        )
        page.wait_for_timeout(3200)  # two more polls
        assert page.evaluate("() => document.activeElement.dataset.marked") == "yes"
    finally:
        _cancel(live_server, job["id"])


def test_an_error_does_not_follow_to_another_tab_and_the_role_is_shown(browser, live_server, tiny_zoo):
    context, page = open_page(browser, live_server)
    try:
        page.console_errors.expect("status of 403")
        enter_key(page, make_key(live_server, "instrument", "an-instrument"))
        assert "instrument" in page.inner_text("#key-role")
        page.click("nav [data-tab='train']")
        page.locator("#notice.error").wait_for()
        assert "Forbidden" in page.inner_text("#notice") or "scientist" in page.inner_text("#notice")
        page.click("nav [data-tab='jobs']")
        page.wait_for_selector("#notice", state="hidden")
        assert not page.console_errors.unexpected()
    finally:
        context.close()


def test_forget_clears_the_jobs_and_the_downloads(page, live_server, tiny_zoo):
    enter_key(page, live_server.key)
    page.click("nav [data-tab='jobs']")
    page.locator("#jobs-body tr.job-row").first.wait_for()
    page.locator("#jobs-body tr.job-row", has_text="fine-tuning").first.click()
    page.locator("#job-detail a.download").first.wait_for()
    page.click("#key-forget")
    assert page.locator("#jobs-body tr.job-row").count() == 0
    assert page.locator("#job-detail a.download").count() == 0
    assert page.locator("#job-detail").is_hidden()
    assert page.evaluate("() => localStorage.getItem('cellfuse.apiKey')") is None
    # Nothing is asked of the server any more without a key.
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url) if "/api/v1/" in request.url else None)
    page.wait_for_timeout(3500)
    assert asked == []


def test_a_plain_multi_page_tiff_counts_its_pages_as_channels(page, live_server, tiny_zoo):
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for value in range(3):
            tif.write(np.full((64, 64), value, np.uint16), metadata=None, photometric="minisblack")
    enter_key(page, live_server.key)
    page.set_input_files(
        "#seg-files", files=[{"name": "plain.tif", "mimeType": "image/tiff", "buffer": buffer.getvalue()}]
    )
    page.wait_for_selector("#seg-file-info:has-text('3 channel(s)')")
    assert page.input_value("#seg-n-channels") == "3"
    assert page.locator("#seg-channels tr").count() == 3


def test_an_unticked_channel_without_a_reporter_does_not_block(page, live_server, tiny_zoo):
    field = small_plate(1, size=64, n_channels=2, seed=9)[0]
    image = np.concatenate([field.image, field.image[:1]], axis=0)  # a third, brightfield-like channel
    data = io.BytesIO()
    tifffile.imwrite(data, image, metadata=None)
    enter_key(page, live_server.key)
    page.set_input_files(
        "#seg-files", files=[{"name": "C03-field1.tif", "mimeType": "image/tiff", "buffer": data.getvalue()}]
    )
    page.wait_for_selector("#seg-file-info:has-text('3 channel(s)')")
    page.select_option("#seg-cell-line", CELL_LINE)
    for i, name in enumerate(tiny_zoo.channels):
        page.select_option(f"select[data-channel='{i}']", name)
    page.uncheck("#seg-zoo-channels")
    page.uncheck("input[data-fuse='2']")
    assert page.input_value("select[data-channel='2']") == ""
    page.click("#seg-submit")
    page.wait_for_selector("#job-detail h3 .badge")
    job_id = page.evaluate("() => location.hash.split('/').pop()")
    job = live_server.client().job(job_id)
    assert job["params"]["channels"][:2] == tiny_zoo.channels
    assert set(job["summary"].get("fused_channels", {}).get("nuclei", tiny_zoo.channels)) <= set(tiny_zoo.channels)


def test_api_documentation_works_offline(page, live_server):
    base = live_server.base_url
    outside: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith(base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    page.goto("/docs")
    page.locator(".swagger-ui .info .title", has_text="CellFuse").wait_for(timeout=20_000)
    page.locator(".swagger-ui .opblock").first.wait_for()
    assert outside == []


def test_favicon_and_chart_legend(page, live_server, tiny_zoo):
    icon = page.request.get(live_server.base_url + "/favicon.ico")
    assert icon.status == 200 and "svg" in icon.headers["content-type"]
    enter_key(page, live_server.key)
    assert page.locator("link[rel=icon]").get_attribute("href") == "/static/favicon.svg"
    page.click("nav [data-tab='zoo']")
    page.locator("#curve svg.curve polyline").first.wait_for()
    boxes = page.evaluate("""() => {
      const svg = document.querySelector('#curve svg.curve');
      const box = (n) => { const r = n.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
      return {legend: [...svg.querySelectorAll('.legend-band text')].map(box),
              plot: [...svg.querySelectorAll('polyline, circle, line.best')].map(box)};
    }""")
    assert len(boxes["legend"]) >= 2

    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for i, a in enumerate(boxes["legend"]):
        assert not any(overlap(a, b) for b in boxes["plot"]), "a legend label lies on the curves"
        assert not any(overlap(a, b) for b in boxes["legend"][i + 1 :]), "legend labels overlap"


CONTRAST_JS = """() => {
  const lum = (rgb) => { const c = rgb.match(/\\d+(\\.\\d+)?/g).slice(0, 3).map(Number).map((v) => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]; };
  const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
  return [...document.querySelectorAll('.progress')].flatMap((p) => {
    const ink = getComputedStyle(p.querySelector('.progress-text')).color;
    const bar = getComputedStyle(p.querySelector('.bar')).backgroundColor;
    const track = getComputedStyle(p).backgroundColor;
    return [ratio(ink, bar), ratio(ink, track)];
  });
}"""


def test_progress_text_reads_well(page, live_server, tiny_zoo):
    cancelled = _long_noop(live_server, steps=5)
    _cancel(live_server, cancelled["id"])
    enter_key(page, live_server.key)
    page.click("nav [data-tab='jobs']")
    page.locator("#jobs-body .progress").first.wait_for()
    ratios = page.evaluate(CONTRAST_JS)
    assert ratios and min(ratios) >= 4.5, ratios


@pytest.mark.parametrize("width", [400, 1600])
def test_no_sideways_scrolling(browser, live_server, tiny_zoo, width):
    context, page = open_page(browser, live_server, width=width, height=900)
    try:
        enter_key(page, live_server.key)
        for tab in ("segment", "jobs", "zoo", "train"):
            page.click(f"nav [data-tab='{tab}']")
            page.wait_for_timeout(600)
            if tab == "jobs":
                page.locator("#jobs-body tr.job-row", has_text="fine-tuning").first.click()
                page.locator("#job-detail svg.curve").first.wait_for()
            overflow = no_horizontal_overflow(page)
            assert overflow <= 0, f"{tab} at {width} px: {overflow.culprits}"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"web-jobs-{width}px.png"), full_page=True)
        assert not page.console_errors.unexpected()
    finally:
        context.close()


def test_static_files_stay_inside_the_web_folder(live_server):
    for bad in ("../routes/web.py", "js/../../main.py", "%2e%2e/main.py", "vendor/../../errors.py"):
        assert httpx.get(f"{live_server.base_url}/static/{bad}").status_code == 404, bad
    assert httpx.get(f"{live_server.base_url}/static/vendor/openseadragon/openseadragon.min.js").status_code == 200


AA_JS = """() => {
  const lum = (rgb) => { const c = rgb.match(/[\\d.]+/g).slice(0, 3).map(Number).map((v) => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]; };
  const alpha = (rgb) => { const m = rgb.match(/[\\d.]+/g); return m.length > 3 ? Number(m[3]) : 1; };
  const background = (node) => {
    for (let n = node; n; n = n.parentElement) {
      const bg = getComputedStyle(n).backgroundColor;
      if (alpha(bg) > 0.5) return bg;
    }
    return "rgb(255, 255, 255)";
  };
  const bad = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let t = walker.nextNode(); t; t = walker.nextNode()) {
    const node = t.parentElement;
    if (!t.textContent.trim() || !node || !node.getClientRects().length) continue;
    if (node.closest('svg, canvas, .osd, [hidden], .progress, :disabled, option')) continue;
    const style = getComputedStyle(node);
    if (style.visibility === 'hidden' || Number(style.opacity) < 0.5) continue;
    const [a, b] = [lum(style.color), lum(background(node))].sort((p, q) => q - p);
    const ratio = (a + 0.05) / (b + 0.05);
    const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
    const need = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
    if (ratio < need) bad.push(`${node.tagName.toLowerCase()}.${node.className}: "${t.textContent.trim().slice(0, 30)}" ${ratio.toFixed(2)}`);
  }
  return [...new Set(bad)];
}"""


def test_text_contrast_meets_wcag_aa_and_tabs_work_by_keyboard(page, live_server, tiny_zoo):
    enter_key(page, live_server.key)
    for tab in ("segment", "jobs", "zoo", "train"):
        page.click(f"nav [data-tab='{tab}']")
        page.wait_for_timeout(700)
        if tab == "jobs":
            page.locator("#jobs-body tr.job-row", has_text="fine-tuning").first.click()
            page.locator("#job-detail svg.curve").first.wait_for()
        assert page.evaluate(AA_JS) == [], tab
    # Tabs by keyboard (arrow keys, as in the WAI-ARIA tabs pattern); a job page by Enter on its link.
    page.focus("#tab-btn-train")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("() => document.activeElement.id") == "tab-btn-segment"
    assert page.locator("#tab-segment").is_visible()
    page.keyboard.press("ArrowRight")
    page.locator("#jobs-body a.job-link").first.focus()
    page.keyboard.press("Enter")
    page.wait_for_function("() => location.hash.startsWith('#/jobs/')")
    page.locator("#job-detail h3").wait_for()
    assert page.locator("#live").get_attribute("aria-live") == "polite"


def test_jobs_filter_offers_every_kind_and_pages(page, live_server):
    from app.job_params import JOB_PARAMS

    api = live_server.client()
    # 21 test jobs cancelled at once: one more than a page of the list.
    made = [api.submit("noop", {"steps": 50, "step_seconds": 0.1})["id"] for _ in range(21)]
    for job_id in made:
        _cancel(live_server, job_id)
    deadline = time.monotonic() + 60
    while any(api.job(j)["status"] != "cancelled" for j in made):
        assert time.monotonic() < deadline, "the test jobs did not end cancelled"
        time.sleep(0.3)
    total = api.get("/api/v1/jobs?kind=noop&status=cancelled&limit=1")["total"]
    enter_key(page, live_server.key)
    page.click("nav [data-tab='jobs']")
    # Every job kind the service runs can be filtered on, and no option matches nothing.
    values = [v for v in page.locator("#jobs-kind option").evaluate_all("os => os.map(o => o.value)") if v]
    assert sorted(values) == sorted(JOB_PARAMS), values
    page.select_option("#jobs-kind", "noop")
    page.select_option("#jobs-status", "cancelled")
    page.locator("#jobs-page", has_text=f"1–20 of {total}").wait_for()
    assert page.locator("#jobs-body tr.job-row").count() == 20
    assert page.locator("#jobs-prev").is_disabled() and page.locator("#jobs-next").is_enabled()
    page.click("#jobs-next")
    page.locator("#jobs-page", has_text=f"21–{min(40, total)} of {total}").wait_for()
    assert page.locator("#jobs-body tr.job-row").count() == min(20, total - 20)
    assert page.locator("#jobs-prev").is_enabled()
    page.click("#jobs-prev")
    page.locator("#jobs-page", has_text=f"1–20 of {total}").wait_for()


def test_the_job_page_tells_the_queue_position_and_the_time_left(page, live_server, tiny_zoo):
    running = _long_noop(live_server, steps=120)
    waiting = _long_noop(live_server, steps=5)
    try:
        _wait_running(live_server, running["id"])
        enter_key(page, live_server.key)
        page.goto(f"/#/jobs/{waiting['id']}")
        page.locator("#job-detail .job-timing", has_text="number 1 in the queue").wait_for()
        page.goto(f"/#/jobs/{running['id']}")
        timing = page.locator("#job-detail .job-timing", has_text="left")
        timing.wait_for()
        assert "running for" in timing.inner_text()
        assert "step" in page.locator("#job-detail .progress").get_attribute("aria-valuetext")
        # Screen readers hear the job's status and progress (the live region, not every poll).
        page.wait_for_function(
            "id => document.getElementById('live').textContent.startsWith(`Job ${id}: running`)",
            arg=running["id"][:8],
        )
    finally:
        _cancel(live_server, waiting["id"])
        _cancel(live_server, running["id"])


def test_cancel_during_a_single_field_segmentation_ends_cancelled(page, live_server, tiny_zoo):
    # One large field (1024 x 1024, nuclei and cells): long enough to click Cancel while it runs.
    field = small_plate(1, size=1024, n_channels=2, seed=7)[0]
    enter_key(page, live_server.key)
    page.set_input_files(
        "#seg-files", files=[{"name": "C07-field1.ome.tif", "mimeType": "image/tiff", "buffer": field_tiff(field)}]
    )
    page.wait_for_selector("#seg-file-info:has-text('2 channel(s)')")
    page.select_option("#seg-cell-line", CELL_LINE)
    # The thresholds are explained beside them (in the folded Advanced panel).
    assert page.locator("#seg-thresholds-help").text_content().startswith("Flow threshold:")
    page.click("#seg-submit")
    page.wait_for_function("() => /^#\\/jobs\\/[0-9a-f-]{36}$/.test(location.hash)")
    job_id = page.evaluate("() => location.hash.split('/').pop()")
    page.locator("#job-detail h3 .badge", has_text="running").wait_for(timeout=60_000)
    # Progress inside the field: the job page names the field's step and moves off 0 % before the field
    # ends (before, a lone field sat at 0 % for its whole run).
    inside = re.compile(r"^(\d+)% · field 1 of 1 \(C07[^)]*\): (network|masks)$")
    seen: list[str] = []  # every text the bar showed, for the message if it never moves
    deadline = time.monotonic() + 120
    while True:
        shown = page.inner_text("#job-detail .progress-text")
        if not seen or seen[-1] != shown:
            seen.append(shown)
        match = inside.match(shown)
        if (match and int(match[1]) > 0) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(250)
    assert match and int(match[1]) > 0, seen
    assert int(page.get_attribute("#job-detail .progress", "aria-valuenow")) > 0
    assert page.locator("#job-detail h3 .badge").inner_text() == "running"  # still inside the field
    page.click("#job-detail button.cancel")
    page.locator("#job-detail h3 .badge", has_text="cancelled").wait_for(timeout=120_000)
    # Said in words on the job's page, and the service agrees: not "succeeded" after a Cancel.
    assert "was cancelled" in page.inner_text("#job-detail .job-error")
    assert live_server.client().job(job_id)["status"] == "cancelled"
