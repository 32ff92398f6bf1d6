// The Jobs tab: a filtered, paged list that is polled and updated in place (no re-render, so the
// keyboard focus stays), and one job's page (#/jobs/<id>) with its progress, results, viewer,
// measurements and plate map. Polling backs off while the server is unreachable.
import {$, EXPLAIN, el, fmt, fmtBytes, fmtDuration, fmtScore, fmtTime, saveBlob, scroller} from "./dom.js";
import {ApiError, announce, api, resultBlobUrl, setConnection, showError, showNotice} from "./api.js";
import {state} from "./state.js";
import {trainingCurveSvg} from "./charts.js";
import {openViewer} from "./viewer.js";
import {showMeasurements} from "./measurements.js";
import {showPlate} from "./plate.js";
import {fillJobPreprocessing} from "./preprocessing.js";

const POLL_ACTIVE_MS = 1500;   // while a job runs or the jobs tab is open
const POLL_IDLE_MS = 6000;
const POLL_MAX_MS = 30000;     // the longest wait between retries while the server is unreachable
const PAGE_SIZE = 20;
const ACTIVE = new Set(["queued", "running"]);
export const METHOD_NAMES = {
  flow_fusion: "Flow Fusion", staple: "STAPLE", simple: "SIMPLE", voting: "pixel voting",
  majority_voting: "majority voting",
};
export const KIND_NAMES = {
  segment: "segmentation", "segment-dataset": "segmentation of a dataset", finetune: "fine-tuning",
  evaluate: "evaluation", select_channels: "channel selection", noop: "test job",
  pretrain_isl: "ISL pretraining", self_train: "self-training (no annotations)",
};

const poll = {timer: null, failures: 0, offline: false};
const detail = {jobId: null, signature: "", resultsKey: "", announced: ""};

/** One line that says what a job is about, for the list. */
export function describeJob(job) {
  const p = job.params || {};
  const bits = [];
  if (p.cell_line) bits.push(p.cell_line);
  if (p.reporter) bits.push(`${p.reporter} ${p.object || ""}`.trim());
  if (p.dataset_id) bits.push(`dataset #${p.dataset_id}`);
  if (p.model_version_id) bits.push(`version #${p.model_version_id}`);
  if (p.plate) bits.push(`plate ${p.plate}`);
  if (Array.isArray(p.fields)) bits.push(`${p.fields.length} field(s)`);
  if (p.method && job.kind !== "finetune") bits.push(METHOD_NAMES[p.method] || p.method);
  if (job.kind === "noop") bits.push(`${p.steps || 0} steps`);
  return bits.join(" · ");
}

// ---------------------------------------------------------------------------------------------
// Polling

export function schedulePoll(delay = null) {
  if (poll.timer) clearTimeout(poll.timer);
  const anyActive = state.jobs.some((j) => ACTIVE.has(j.status));
  let wait = delay !== null ? delay : (anyActive || state.tab === "jobs" ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  if (poll.offline && delay === null) wait = Math.min(POLL_MAX_MS, POLL_ACTIVE_MS * 2 ** poll.failures);
  poll.timer = setTimeout(async () => {
    if (state.key && !document.hidden) {
      try {
        await pollJobs();
      } catch (error) {
        if (error instanceof ApiError && (error.status === 401)) showError(error);
      }
    }
    schedulePoll();
  }, wait);
}

export function stopPolling() {
  if (poll.timer) clearTimeout(poll.timer);
  poll.timer = null;
}

function markOffline(error) {
  poll.failures += 1;
  const wait = Math.min(POLL_MAX_MS, POLL_ACTIVE_MS * 2 ** poll.failures);
  if (!poll.offline) announce("The server is unreachable; the page keeps trying.");
  poll.offline = true;
  document.body.classList.add("offline");
  setConnection(`server unreachable — retrying in ${Math.round(wait / 1000)} s`, "bad");
  // What is on screen is no longer live: say so, and offer no action that needs the server.
  for (const button of document.querySelectorAll("button.cancel")) button.hidden = true;
  throw error;
}

function markOnline() {
  if (poll.offline) announce("The server is reachable again.");
  poll.offline = false;
  poll.failures = 0;
  document.body.classList.remove("offline");
  setConnection("connected", "ok");
}

function jobsQuery() {
  const params = new URLSearchParams({limit: String(PAGE_SIZE), offset: String(state.jobsOffset)});
  if ($("jobs-status").value) params.set("status", $("jobs-status").value);
  if ($("jobs-kind").value) params.set("kind", $("jobs-kind").value);
  return `/api/v1/jobs?${params}`;
}

export async function pollJobs() {
  let page;
  try {
    page = await api(jobsQuery());
  } catch (error) {
    if (error.status === 0 || error.status >= 502) markOffline(error);
    throw error;
  }
  markOnline();
  state.jobs = page.items;
  state.jobsTotal = page.total;
  renderJobs();
  if (state.selectedJobId) {
    let job = state.jobs.find((j) => j.id === state.selectedJobId);
    if (!job) job = await api(`/api/v1/jobs/${encodeURIComponent(state.selectedJobId)}`);
    let position = null;
    if (job.status === "queued") {
      const queued = await api("/api/v1/jobs?status=queued&limit=200");
      position = queued.items.filter((j) => j.created_at <= job.created_at).length;
    }
    renderJobDetail(job, position);
  }
}

// ---------------------------------------------------------------------------------------------
// The list

export function statusBadge(job) {
  const label = job.status === "running" && job.cancel_requested ? "cancelling" : job.status;
  return el("span", {class: `badge ${job.status}`}, label);
}

function progressPercent(job) {
  return Math.round(100 * (job.status === "succeeded" ? 1 : Math.max(0, Math.min(1, job.progress || 0))));
}

function progressBar(job) {
  const percent = progressPercent(job);
  const text = `${percent}%${job.stage ? ` · ${job.stage}` : ""}`;
  return el("div", {class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
    "aria-valuenow": percent, "aria-valuetext": text, "aria-label": "progress", title: job.stage || ""},
  el("div", {class: `bar ${job.status}`, style: {width: `${percent}%`}}),
  el("span", {class: "progress-text"}, text));
}

/** Update a progress bar in place (a new node would lose a screen reader's place). */
function updateProgress(node, job) {
  const percent = progressPercent(job);
  const text = `${percent}%${job.stage ? ` · ${job.stage}` : ""}`;
  node.setAttribute("aria-valuenow", percent);
  node.setAttribute("aria-valuetext", text);
  node.title = job.stage || "";
  node.querySelector(".bar").className = `bar ${job.status}`;
  node.querySelector(".bar").style.width = `${percent}%`;
  node.querySelector(".progress-text").textContent = text;
}

function cancelButton(job) {
  return el("button", {type: "button", class: "secondary small cancel", "aria-label": `cancel job ${job.id.slice(0, 8)}`,
    onclick: (event) => { event.stopPropagation(); cancelJob(job.id); }}, "Cancel");
}

function canCancel(job) {
  return ACTIVE.has(job.status) && !job.cancel_requested && !poll.offline;
}

function newJobRow(job) {
  return el("tr", {class: "job-row", "data-job": job.id, onclick: () => openJob(job.id)},
    el("td", {}, el("a", {href: `#/jobs/${job.id}`, class: "job-link", title: job.id,
      onclick: (event) => event.stopPropagation()}, job.id.slice(0, 8))),
    el("td", {class: "job-what"}, el("div", {}, KIND_NAMES[job.kind] || job.kind),
      el("div", {class: "muted small-text job-description"}, describeJob(job))),
    el("td", {class: "job-status"}, statusBadge(job)),
    el("td", {class: "progress-cell"}, progressBar(job), el("div", {class: "job-error"})),
    el("td", {class: "job-time"}, fmtTime(job.created_at)),
    el("td", {class: "job-actions"}));
}

function updateJobRow(row, job) {
  const signature = JSON.stringify([job.status, job.progress, job.stage, job.cancel_requested, job.error,
    poll.offline, state.selectedJobId === job.id]);
  if (row.dataset.signature === signature) return;
  row.dataset.signature = signature;
  row.classList.toggle("selected", job.id === state.selectedJobId);
  row.querySelector(".job-status").replaceChildren(statusBadge(job));
  updateProgress(row.querySelector(".progress"), job);
  row.querySelector(".job-error").textContent = job.error || "";
  const actions = row.querySelector(".job-actions");
  const existing = actions.querySelector("button.cancel");
  if (canCancel(job)) {
    if (!existing) actions.append(cancelButton(job));
    else existing.hidden = false;
  } else if (existing) {
    existing.remove();
  }
}

export function renderJobs() {
  const body = $("jobs-body");
  const rows = new Map([...body.querySelectorAll("tr.job-row")].map((r) => [r.dataset.job, r]));
  const wanted = state.jobs.map((job) => {
    const row = rows.get(job.id) || newJobRow(job);
    updateJobRow(row, job);
    return row;
  });
  const current = [...body.children];
  const same = current.length === wanted.length && current.every((r, i) => r === wanted[i]);
  if (!same) {
    if (!wanted.length) {
      body.replaceChildren(el("tr", {}, el("td", {colspan: 6, class: "muted"},
        $("jobs-status").value || $("jobs-kind").value ? "No job matches these filters." : "No jobs yet.")));
    } else {
      // Rows that stay keep their nodes (and the focus inside them); only new ones are built.
      for (const row of current) if (!wanted.includes(row)) row.remove();
      wanted.forEach((row, i) => { if (body.children[i] !== row) body.insertBefore(row, body.children[i] || null); });
    }
  }
  const first = state.jobsTotal ? state.jobsOffset + 1 : 0;
  const last = Math.min(state.jobsTotal, state.jobsOffset + state.jobs.length);
  $("jobs-page").textContent = `${first}–${last} of ${state.jobsTotal}`;
  $("jobs-prev").disabled = state.jobsOffset === 0;
  $("jobs-next").disabled = state.jobsOffset + PAGE_SIZE >= state.jobsTotal;
}

/** Empty the list and the job page (the key was forgotten). */
export function clearJobs() {
  $("jobs-body").replaceChildren(el("tr", {}, el("td", {colspan: 6, class: "muted"}, "No jobs yet.")));
  $("jobs-page").textContent = "";
  $("job-detail").replaceChildren();
  $("job-detail").hidden = true;
  Object.assign(detail, {jobId: null, signature: "", resultsKey: "", announced: ""});
}

export function openJob(jobId) {
  if (location.hash !== `#/jobs/${jobId}`) location.hash = `#/jobs/${jobId}`;
}

/** Called by the router for #/jobs/<id>. */
export function selectJob(jobId) {
  state.selectedJobId = jobId;
  detail.signature = "";
  pollJobs().catch(showError);
}

async function cancelJob(jobId) {
  try {
    const job = await api(`/api/v1/jobs/${encodeURIComponent(jobId)}/cancel`, {method: "POST"});
    showNotice("Cancel requested", job.status === "cancelled" ? "the job was cancelled"
      : "the job stops at its next checkpoint", "info");
    await pollJobs();
  } catch (error) {
    showError(error);
  }
}

// ---------------------------------------------------------------------------------------------
// One job's page

const COUNT_KEYS = new Set(["tp", "fp", "fn"]);
const METRIC_COLUMNS = [["f1", "F1"], ["precision", "Precision"], ["recall", "Recall"], ["jaccard", "Jaccard"],
  ["map_50_95", "mAP .5:.95"], ["tp", "TP"], ["fp", "FP"], ["fn", "FN"]];

export function metricsTable(rowsByName, firstHeader) {
  const head = el("tr", {}, el("th", {}, firstHeader), METRIC_COLUMNS.map(([, label]) => el("th", {}, label)));
  const body = Object.entries(rowsByName).map(([name, m]) => el("tr", {}, el("td", {}, name),
    METRIC_COLUMNS.map(([key]) => el("td", {class: "num"}, COUNT_KEYS.has(key) ? fmt(m[key]) : fmtScore(m[key])))));
  return scroller(el("table", {class: "list metrics-table"}, el("thead", {}, head), el("tbody", {}, body)));
}

export function rankingTable(ranking, chosen) {
  const chosenKey = JSON.stringify(chosen || []);
  const head = el("tr", {}, el("th", {}, "Channels"), ["F1", "F1 95% interval", "Precision", "Recall", "Jaccard",
    "mAP .5:.95"].map((h) => el("th", {}, h)));
  // A bootstrap over validation fields: sets whose intervals overlap the best one's are within noise.
  const interval = (r) => (Array.isArray(r.f1_interval) ? `${fmtScore(r.f1_interval[0])}–${fmtScore(r.f1_interval[1])}` : "–");
  const rows = ranking.map((r) => el("tr", {class: JSON.stringify(r.channels) === chosenKey ? "chosen" : ""},
    el("td", {}, (r.channels || []).join(" + ")), el("td", {class: "num"}, fmtScore(r.f1)),
    el("td", {class: "num"}, interval(r)),
    ["precision", "recall", "jaccard", "map_50_95"].map((k) => el("td", {class: "num"}, fmtScore(r[k])))));
  return scroller(el("table", {class: "list ranking"}, el("thead", {}, head), el("tbody", {}, rows)));
}

function detailSection(title, ...content) {
  return el("section", {class: "detail-section"}, el("h4", {}, title), ...content);
}

function timing(job, position) {
  const now = Date.now();
  const started = job.started_at ? Date.parse(job.started_at) : null;
  const finished = job.finished_at ? Date.parse(job.finished_at) : null;
  if (job.status === "queued") {
    return position ? `waiting: number ${position} in the queue` : "waiting in the queue";
  }
  if (!started) return "";
  const elapsed = ((finished || now) - started) / 1000;
  if (job.status !== "running") return `took ${fmtDuration(elapsed)}`;
  const p = job.progress || 0;
  const eta = p > 0.02 ? (elapsed / p) * (1 - p) : null;
  return `running for ${fmtDuration(elapsed)}` + (eta !== null ? ` · about ${fmtDuration(eta)} left` : "");
}

async function downloadResult(result) {
  try {
    const url = await resultBlobUrl(result);
    const link = el("a", {href: url, download: result.name.replaceAll("/", "_")});
    document.body.append(link);
    link.click();
    link.remove();
  } catch (error) {
    showError(error);
  }
}

async function downloadAll(job, button) {
  button.disabled = true;
  const old = button.textContent;
  button.textContent = "preparing the archive…";
  try {
    const response = await api(`/api/v1/jobs/${job.id}/results.zip`, {raw: true});
    saveBlob(await response.blob(), `cellfuse-${job.kind}-${job.id.slice(0, 8)}.zip`);
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
    button.textContent = old;
  }
}

function fieldsTable(job, s) {
  const objects = [...new Set(s.fields.flatMap((f) => Object.keys(f.objects || {})))];
  const head = el("tr", {}, el("th", {}, "Field"), el("th", {}, "Well"),
    objects.map((o) => el("th", {}, `${o} found`)), el("th", {}, "Seconds"), el("th", {}, ""));
  const rows = s.fields.map((f) => el("tr", {"data-field": f.field}, el("td", {}, f.field), el("td", {}, f.well || "–"),
    objects.map((o) => el("td", {class: "num"}, fmt((f.objects || {})[o]))), el("td", {class: "num"}, fmt(f.seconds, 2)),
    el("td", {}, el("button", {type: "button", class: "secondary small view-field", "data-field": f.field,
      onclick: () => showField(job, f.field)}, "View"))));
  for (const failed of s.failed_fields || []) {
    rows.push(el("tr", {class: "failed"}, el("td", {}, failed.field),
      el("td", {colspan: objects.length + 3, class: "job-error"}, `failed: ${failed.error}`)));
  }
  return scroller(el("table", {class: "list fields-table"}, el("thead", {}, head), el("tbody", {}, rows)));
}

/** Open one field in the viewer and its measurements below it. */
export function showField(job, field) {
  const box = $("field-view");
  if (!box) return;
  box.hidden = false;
  $("field-view-title").textContent = `Field ${field}`;
  for (const b of document.querySelectorAll("button.view-field")) b.setAttribute("aria-pressed", String(b.dataset.field === field));
  openViewer($("viewer-box"), job, field).catch(showError);
  const table = job.results.find((r) => r.kind === "measurements" && (r.meta || {}).field === field);
  showMeasurements($("measurements-box"), table || null).catch(showError);
}

function renderHeader(job, position) {
  const p = job.params || {};
  const s = job.summary || {};
  const facts = [];
  if (p.cell_line) facts.push(["Cell line", p.cell_line]);
  if (p.method) facts.push(["Method", METHOD_NAMES[p.method] || p.method]);
  if (p.channels) facts.push(["Channels", p.channels.join(", ")]);
  if (s.fused_channels) {
    facts.push(["Fused", Object.entries(s.fused_channels).map(([o, c]) => `${o}: ${c.join(" + ")}`).join("; ")]);
  }
  if (p.alias) facts.push(["Models", `alias ${p.alias}`]);
  if (p.reporter) facts.push(["Reporter", `${p.reporter} (${p.object})`]);
  if (p.fields) facts.push(["Fields", String(p.fields.length)]);
  facts.push(["Submitted", fmtTime(job.created_at)]);
  if (job.finished_at) facts.push(["Finished", fmtTime(job.finished_at)]);
  return [
    el("h3", {}, el("span", {}, `${KIND_NAMES[job.kind] || job.kind} `, el("code", {}, job.id.slice(0, 8))),
      el("span", {class: "job-badge"}, statusBadge(job)),
      el("a", {href: `#/jobs/${job.id}`, class: "permalink", title: "a link to this job's page"}, "link")),
    el("p", {class: "muted job-description"}, describeJob(job)),
    el("dl", {class: "facts"}, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    progressBar(job),
    el("p", {class: "muted job-timing"}, timing(job, position)),
    el("div", {class: "job-actions"}, canCancel(job) ? cancelButton(job) : null),
    job.error ? el("p", {class: "job-error"}, `This job ${job.status === "cancelled" ? "was cancelled" : "failed"}: ${job.error}`) : null,
  ];
}

function renderResults(job) {
  const p = job.params || {};
  const s = job.summary || {};
  const parts = [];
  if (job.results.length) {
    parts.push(el("p", {}, el("button", {type: "button", id: "download-all", class: "secondary",
      onclick: (event) => downloadAll(job, event.currentTarget)}, `Download all (${job.results.length} files, zip)`)));
  }
  if (Array.isArray(s.fields) && s.fields.length) {
    const wells = new Set(s.fields.map((f) => f.well).filter(Boolean));
    if (wells.size > 1 || p.plate) {
      parts.push(detailSection(`Plate${p.plate ? ` ${p.plate}` : ""}`, el("div", {id: "plate-box"})));
    }
    parts.push(detailSection("Fields", fieldsTable(job, s)));
    if (job.results.some((r) => r.name === "provenance.json")) {
      parts.push(el("section", {id: "job-preprocessing", class: "detail-section"}, el("h4", {}, "Preprocessing"),
        el("div", {id: "preprocessing-box"}, el("p", {class: "muted"}, "loading…"))));
    }
    parts.push(el("section", {id: "field-view", class: "detail-section", hidden: true},
      el("h4", {id: "field-view-title"}, "Field"),
      el("div", {id: "viewer-box"}), el("div", {id: "measurements-box"})));
  } else if (Array.isArray(s.failed_fields) && s.failed_fields.length) {
    parts.push(detailSection("Fields", el("ul", {}, s.failed_fields.map((f) => el("li", {class: "job-error"},
      `${f.field}: ${f.error}`)))));
  }
  // Plate QC: implausible fields and drifted reporters (details in qc.json).
  if (s.qc) {
    const flagged = s.qc.flagged_fields || [];
    const drifted = s.qc.drifted_channels || [];
    parts.push(detailSection("Plate QC",
      el("p", {class: flagged.length ? "job-error" : ""},
        flagged.length ? `Implausible field(s) for this plate or cell line: ${flagged.join(", ")}`
          : "No field is implausible against the plate or past plates of this cell line."),
      el("p", {class: drifted.length ? "job-error" : ""},
        drifted.length ? `Reporter drift (style far from the model's training images): ${drifted.join(", ")}`
          : "No reporter drift against the models' training images.")));
  }
  if (s.ome_zarr) {
    parts.push(detailSection("OME-Zarr", el("p", {},
      `NGFF ${s.ome_zarr.version}: labels ${(s.ome_zarr.labels || []).join(", ")} next to each image; tables: ` +
      `${(s.ome_zarr.tables || []).join(", ")}` +
      (s.ome_zarr.path ? ` in ${s.ome_zarr.path}` : "; download plate.ome.zarr.zip below"))));
  }
  const metrics = s.metrics || s.test_metrics;
  if (metrics && Object.keys(metrics).length) {
    const rowsByName = "f1" in metrics ? {[p.object || "all"]: metrics} : metrics;
    parts.push(detailSection("Accuracy against the annotations (a match is IoU ≥ 0.5)",
      el("p", {class: "muted explain"}, EXPLAIN.f1, " ", EXPLAIN.map), metricsTable(rowsByName, "Object")));
  }
  if (Array.isArray(s.ranking) && s.ranking.length) {
    parts.push(detailSection(`Channel subsets (chosen: ${(s.chosen || []).join(" + ")})`, rankingTable(s.ranking, s.chosen)));
  }
  if (Array.isArray(s.training_curve) && s.training_curve.length) {
    parts.push(detailSection("Training curve", trainingCurveSvg(s.training_curve, s.best_epoch)));
  }
  if (job.results.length) {
    const rows = job.results.map((r) => el("tr", {},
      el("td", {}, el("a", {href: "#", class: "download", "data-name": r.name,
        onclick: (event) => { event.preventDefault(); downloadResult(r); }}, r.name)),
      el("td", {}, r.kind.replaceAll("_", " ")), el("td", {class: "num"}, fmtBytes(r.size_bytes))));
    parts.push(detailSection("Downloads", scroller(el("table", {class: "list downloads"},
      el("thead", {}, el("tr", {}, el("th", {}, "File"), el("th", {}, "What"), el("th", {}, "Size"))),
      el("tbody", {}, rows)))));
  }
  return parts;
}

function renderJobDetail(job, position) {
  const panel = $("job-detail");
  panel.hidden = false;
  const signature = JSON.stringify([job.id, job.status, job.progress, job.stage, job.error, job.cancel_requested,
    position, poll.offline]);
  const resultsKey = JSON.stringify([job.id, job.status, job.results.length]);
  if (detail.jobId !== job.id) {
    panel.replaceChildren(el("div", {id: "job-head"}), el("div", {id: "job-results"}));
    Object.assign(detail, {jobId: job.id, signature: "", resultsKey: "", announced: ""});
  }
  if (signature !== detail.signature) {
    detail.signature = signature;
    const head = $("job-head");
    const focused = head.contains(document.activeElement) ? document.activeElement.className : null;
    const bar = head.querySelector(".progress");
    if (bar && head.dataset.status === job.status && head.dataset.cancel === String(canCancel(job))) {
      // Only the numbers moved: update them where they are.
      updateProgress(bar, job);
      head.querySelector(".job-timing").textContent = timing(job, position);
    } else {
      head.replaceChildren(...renderHeader(job, position).filter(Boolean));
      head.dataset.status = job.status;
      head.dataset.cancel = String(canCancel(job));
      if (focused) {
        const again = head.querySelector(`.${focused.split(" ").filter(Boolean).join(".")}`);
        if (again) again.focus();
      }
    }
    // Screen readers hear the status and every quarter of the progress, not every poll.
    const said = `${job.status}:${Math.floor(progressPercent(job) / 25)}`;
    if (said !== detail.announced) {
      detail.announced = said;
      announce(`Job ${job.id.slice(0, 8)}: ${job.status}, ${progressPercent(job)} percent`);
    }
  }
  if (resultsKey !== detail.resultsKey) {
    detail.resultsKey = resultsKey;
    $("job-results").replaceChildren(...renderResults(job).filter(Boolean));
    const s = job.summary || {};
    if ($("preprocessing-box")) fillJobPreprocessing($("preprocessing-box"), job).catch(showError);
    if ($("plate-box")) showPlate($("plate-box"), job, (field) => showField(job, field)).catch(showError);
    if (job.status === "succeeded" && Array.isArray(s.fields) && s.fields.length) showField(job, s.fields[0].field);
  }
}

export function initJobs() {
  $("jobs-refresh").addEventListener("click", () => pollJobs().catch(showError));
  for (const id of ["jobs-status", "jobs-kind"]) {
    $(id).addEventListener("change", () => { state.jobsOffset = 0; pollJobs().catch(showError); });
  }
  $("jobs-prev").addEventListener("click", () => {
    state.jobsOffset = Math.max(0, state.jobsOffset - PAGE_SIZE);
    pollJobs().catch(showError);
  });
  $("jobs-next").addEventListener("click", () => {
    state.jobsOffset += PAGE_SIZE;
    pollJobs().catch(showError);
  });
}
