// CellFuse web page: plain JavaScript, no build step, no external resources.
// Every API call carries the key from the box at the top (kept in localStorage), and every error the
// API returns (RFC 9457 problem details) is shown as its title and detail.
"use strict";

const KEY_STORAGE = "cellfuse.apiKey";
const POLL_ACTIVE_MS = 1500;   // while a job runs or the jobs tab is open
const POLL_IDLE_MS = 6000;
const ACTIVE = new Set(["queued", "running"]);
const METHOD_NAMES = {
  flow_fusion: "Flow Fusion", staple: "STAPLE", simple: "SIMPLE", voting: "pixel voting",
  majority_voting: "majority voting",
};
const KIND_NAMES = {
  segment: "segmentation", "segment-dataset": "segmentation of a dataset", finetune: "fine-tuning",
  evaluate: "evaluation", select_channels: "channel selection", noop: "test job",
  pretrain_isl: "ISL pretraining", self_train: "self-training (no annotations)",
};

const state = {
  key: "",
  tab: "segment",
  reporters: [],
  cellLines: [],
  jobs: [],
  jobsSignature: "",
  selectedJobId: null,
  detailSignature: "",
  blobUrls: new Map(),          // result url + sha256 -> object URL (fetched once, with the key)
  versions: [],
  selectedVersionId: null,
  datasets: [],
  pollTimer: null,
};

// ---------------------------------------------------------------------------------------------
// Small helpers

const $ = (id) => document.getElementById(id);

/** el("td", {class: "num"}, "0.91") -> <td class="num">0.91</td>; children are text or nodes. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined || value === "") return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  return String(value);
}

/** A score in [0, 1] (F1, precision, ...): always three decimals, so 0 and 1 read as scores too. */
function fmtScore(value) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(3) : fmt(value);
}

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function fmtTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

function fillTable(tbody, rows, emptyText, columns) {
  tbody.replaceChildren();
  if (!rows.length) {
    tbody.append(el("tr", {}, el("td", {colspan: columns, class: "muted"}, emptyText)));
    return;
  }
  for (const row of rows) tbody.append(row);
}

// ---------------------------------------------------------------------------------------------
// API calls and errors

class ApiError extends Error {
  constructor(title, detail, status = 0) {
    super(`${title}: ${detail}`);
    this.title = title;
    this.detail = detail;
    this.status = status;
  }
}

const STATUS_HINTS = {
  401: "Check the API key at the top of the page.",
  403: "Your key does not allow this; ask an administrator for a key with more rights.",
  413: "Send a smaller file, or split the plate into several jobs.",
  503: "The service is busy or restarting; try again in a minute.",
};

async function problemFrom(response) {
  const type = response.headers.get("content-type") || "";
  let title = response.statusText || `Error ${response.status}`;
  let detail = "";
  try {
    if (type.includes("json")) {
      const problem = await response.json();
      title = problem.title || title;
      detail = typeof problem.detail === "string" ? problem.detail : JSON.stringify(problem.detail || "");
    } else {
      detail = (await response.text()).slice(0, 300);
    }
  } catch (_ignored) {
    detail = "the server's answer could not be read";
  }
  const hint = STATUS_HINTS[response.status];
  if (hint && !detail.includes(hint)) detail = detail ? `${detail}. ${hint}` : hint;
  return new ApiError(title, detail, response.status);
}

async function api(path, {method = "GET", json, form, raw = false} = {}) {
  if (!state.key) throw new ApiError("No API key", "enter your API key at the top of the page first");
  const headers = {"X-API-Key": state.key, Accept: "application/json, application/problem+json"};
  let body;
  if (form) body = form;  // the browser sets the multipart boundary itself
  else if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, {method, headers, body, cache: "no-store"});
  } catch (error) {
    throw new ApiError("The server cannot be reached", `check the network and try again (${error.message})`);
  }
  if (!response.ok) throw await problemFrom(response);
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

let noticeTimer = null;

function showNotice(title, detail, kind = "error") {
  // Errors stay until dismissed; good news fades after a while.
  if (noticeTimer) clearTimeout(noticeTimer);
  noticeTimer = kind === "info" ? setTimeout(clearNotice, 8000) : null;
  $("notice-title").textContent = title;
  $("notice-detail").textContent = detail || "";
  $("notice").className = `notice ${kind}`;
  $("notice").hidden = false;
}

function showError(error) {
  if (error instanceof ApiError) showNotice(error.title, error.detail);
  else showNotice("Something went wrong in the page", String(error && error.message ? error.message : error));
}

function clearNotice() {
  $("notice").hidden = true;
}

// ---------------------------------------------------------------------------------------------
// Key and tabs

function setKey(key) {
  state.key = key.trim();
  if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
  else localStorage.removeItem(KEY_STORAGE);
  $("api-key").value = state.key;
  $("key-state").textContent = state.key ? "key saved in this browser" : "no key yet";
}

async function onKeySaved() {
  clearNotice();
  try {
    await loadReference();
    $("key-state").textContent = "key saved; connected";
    refreshCurrentTab();
    schedulePoll(0);
  } catch (error) {
    showError(error);
  }
}

function showTab(name) {
  state.tab = name;
  for (const button of document.querySelectorAll(".tabs [role=tab]")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const section of document.querySelectorAll("section.tab")) {
    section.hidden = section.dataset.tab !== name;
  }
  refreshCurrentTab();
  schedulePoll(0);
}

function refreshCurrentTab() {
  if (!state.key) return;
  const run = {segment: loadReference, jobs: pollJobs, zoo: loadZoo, train: loadTrainForm}[state.tab];
  if (run) run().catch(showError);
}

// ---------------------------------------------------------------------------------------------
// Reference lists: cell lines and reporters

async function loadReference() {
  const [cellLines, reporters] = await Promise.all([api("/api/v1/cell-lines"), api("/api/v1/reporters")]);
  state.cellLines = cellLines;
  state.reporters = reporters;
  const select = $("seg-cell-line");
  const previous = select.value;
  select.replaceChildren(...(cellLines.length
    ? cellLines.map((c) => el("option", {value: c.name}, c.name))
    : [el("option", {value: ""}, "no cell lines registered")]));
  if (cellLines.some((c) => c.name === previous)) select.value = previous;
  renderChannelRows();
}

// ---------------------------------------------------------------------------------------------
// Segmentation form

/** What the TIFF says about its channels, read from the first IFD's ImageDescription (tag 270).
 *  -> {count, names} or null. Only a few small slices of the file are read. */
async function readTiffChannels(file) {
  const read = async (offset, length) => new DataView(await file.slice(offset, offset + length).arrayBuffer());
  if (file.size < 16) return null;
  const header = await read(0, 16);
  const order = String.fromCharCode(header.getUint8(0), header.getUint8(1));
  if (order !== "II" && order !== "MM") return null;
  const le = order === "II";
  const magic = header.getUint16(2, le);
  if (magic !== 42 && magic !== 43) return null;
  const big = magic === 43;
  const ifd = big ? Number(header.getBigUint64(8, le)) : header.getUint32(4, le);
  if (!ifd || ifd >= file.size) return null;
  const countView = await read(ifd, big ? 8 : 2);
  const nEntries = big ? Number(countView.getBigUint64(0, le)) : countView.getUint16(0, le);
  const entrySize = big ? 20 : 12;
  const entries = await read(ifd + (big ? 8 : 2), Math.min(nEntries, 512) * entrySize);
  let description = "";
  let samples = 1;
  for (let i = 0; i < Math.min(nEntries, 512); i += 1) {
    const at = i * entrySize;
    if (at + entrySize > entries.byteLength) break;
    const tag = entries.getUint16(at, le);
    const type = entries.getUint16(at + 2, le);
    const count = big ? Number(entries.getBigUint64(at + 4, le)) : entries.getUint32(at + 4, le);
    const valueAt = at + (big ? 12 : 8);
    if (tag === 277 && type === 3) samples = entries.getUint16(valueAt, le);
    if (tag === 270 && type === 2 && count > 0 && count < 4 * 1024 * 1024) {
      const inline = count <= (big ? 8 : 4);
      const bytes = inline
        ? new Uint8Array(entries.buffer, entries.byteOffset + valueAt, count)
        : new Uint8Array((await read(big ? Number(entries.getBigUint64(valueAt, le)) : entries.getUint32(valueAt, le),
          count)).buffer);
      description = new TextDecoder("utf-8").decode(bytes).replace(/\0+$/, "");
    }
  }
  const unescape = (s) => s.replace(/&quot;/g, '"').replace(/&apos;/g, "'").replace(/&lt;/g, "<")
    .replace(/&gt;/g, ">").replace(/&amp;/g, "&");
  const names = [...description.matchAll(/<Channel\b[^>]*?\bName="([^"]*)"/g)].map((m) => unescape(m[1]));
  if (names.length) return {count: names.length, names};
  const sizeC = description.match(/\bSizeC="(\d+)"/) || description.match(/\bchannels=(\d+)/);
  if (sizeC) return {count: Number(sizeC[1]), names: []};
  if (samples > 1) return {count: samples, names: []};
  return {count: null, names: []};
}

function channelNamesFromFile() {
  return ($("seg-channels").dataset.fileNames || "").split("\u0001").filter((s) => s !== "");
}

function renderChannelRows(fileNames = null) {
  const body = $("seg-channels");
  if (fileNames) body.dataset.fileNames = fileNames.join("\u0001");
  const names = channelNamesFromFile();
  const count = Math.max(1, Math.min(8, Number($("seg-n-channels").value) || 1));
  const previous = [...body.querySelectorAll("select")].map((s) => s.value);
  const previousFuse = [...body.querySelectorAll("input[type=checkbox]")].map((c) => c.checked);
  const zooChooses = $("seg-zoo-channels").checked;
  body.replaceChildren();
  for (let i = 0; i < count; i += 1) {
    const select = el("select", {"data-channel": i, "aria-label": `reporter of channel ${i + 1}`},
      el("option", {value: ""}, "— choose a reporter —"),
      state.reporters.map((r) => el("option", {value: r.name},
        r.localisation && r.localisation !== r.name ? `${r.name} (${r.localisation})` : r.name)));
    const fromFile = names[i] ? state.reporters.find((r) => r.name.toLowerCase() === names[i].toLowerCase()) : null;
    if (previous[i] && state.reporters.some((r) => r.name === previous[i]) && !fileNames) select.value = previous[i];
    else if (fromFile) select.value = fromFile.name;
    const fuse = el("input", {type: "checkbox", "data-fuse": i, "aria-label": `fuse channel ${i + 1}`});
    fuse.checked = previousFuse[i] !== undefined ? previousFuse[i] : true;
    fuse.disabled = zooChooses;
    body.append(el("tr", {},
      el("td", {}, `${i + 1}`, names[i] ? el("span", {class: "muted"}, ` (file: ${names[i]})`) : null),
      el("td", {}, select), el("td", {}, fuse)));
  }
}

async function onFilesChosen() {
  const files = [...$("seg-files").files];
  const info = $("seg-file-info");
  if (!files.length) {
    info.textContent = "";
    return;
  }
  const total = files.reduce((n, f) => n + f.size, 0);
  let text = `${files.length} file(s), ${fmtBytes(total)}.`;
  try {
    const found = await readTiffChannels(files[0]);
    if (found === null) {
      text += ` ${files[0].name} does not look like a TIFF file; the server will check it.`;
    } else if (found.count) {
      $("seg-n-channels").value = String(Math.min(8, found.count));
      text += ` ${files[0].name} has ${found.count} channel(s)` +
        (found.names.length ? `: ${found.names.join(", ")}.` : ".");
      renderChannelRows(found.names);
      info.textContent = text;
      return;
    } else {
      text += " The number of channels could not be read from the file; set it below.";
    }
  } catch (_ignored) {
    text += " The file's header could not be read; set the number of channels below.";
  }
  renderChannelRows([]);
  info.textContent = text;
}

/** Well and field from an HCS-style file name, when it starts with the well:
 *  "B02-field1.ome.tif" -> {well: "B02", field: 1}; "B02_s3_w1.tif" -> {well: "B02", field: 3};
 *  "r02c03f01p01-ch1.tiff" -> {well: "B03", field: 1};
 *  anything else -> null (the server then names fields F001, F002, ...). */
function wellFromName(name) {
  // Operetta / Opera Phenix names: r02c03f01... = row 2 (B), column 3, field 1.
  const operetta = name.match(/^r(\d{2})c(\d{2})f(\d{2,3})/i);
  if (operetta && Number(operetta[1]) >= 1 && Number(operetta[1]) <= 26) {
    return {well: String.fromCharCode(64 + Number(operetta[1])) + operetta[2], field: Number(operetta[3])};
  }
  const well = name.match(/^([A-Za-z]{1,2}\d{1,3})(?=[^0-9]|$)/);
  if (!well) return null;
  const field = name.slice(well[1].length).match(/(?:field|fld|_s|-s|_f|-f)(\d{1,4})(?!\d)/i);
  return {well: well[1].toUpperCase(), field: field ? Number(field[1]) : null};
}

function numberOrNull(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function buildSegmentRequest() {
  const files = [...$("seg-files").files];
  if (!files.length) throw new ApiError("No image chosen", "choose at least one TIFF file to segment");
  const cellLine = $("seg-cell-line").value;
  if (!cellLine) throw new ApiError("No cell line", "register a cell line in the zoo first, then choose it here");
  const channels = [...$("seg-channels").querySelectorAll("select")].map((s) => s.value);
  const missing = channels.map((c, i) => (c ? null : i + 1)).filter((i) => i !== null);
  if (missing.length) throw new ApiError("Channels without a reporter", `choose the reporter of channel(s) ${missing.join(", ")}`);
  const repeated = channels.filter((c, i) => channels.indexOf(c) !== i);
  if (repeated.length) throw new ApiError("A reporter is used twice", `each channel needs its own reporter (${[...new Set(repeated)].join(", ")} appears more than once)`);
  const objects = [...document.querySelectorAll("#segment-form input[name=objects]:checked")].map((c) => c.value);
  if (!objects.length) throw new ApiError("Nothing to find", "tick nuclei, whole cells, or both");
  const request = {cell_line: cellLine, channels, objects, method: $("seg-method").value,
    alias: $("seg-alias").value.trim() || "production", params: {}};
  if (!$("seg-zoo-channels").checked) {
    const use = [...$("seg-channels").querySelectorAll("input[data-fuse]")]
      .filter((c) => c.checked).map((c) => channels[Number(c.dataset.fuse)]);
    if (!use.length) throw new ApiError("No channel to fuse", "tick at least one channel to fuse");
    request.use_channels = use;
  }
  const wells = files.map((f) => wellFromName(f.name));
  if (wells.every((w) => w !== null)) request.fields = wells;
  const plate = $("seg-plate").value.trim();
  if (plate) request.plate = plate;
  const diameter = numberOrNull("seg-diameter");
  if (diameter !== null) request.params.diameter = diameter;
  const flow = numberOrNull("seg-flow-threshold");
  if (flow !== null) request.params.flow_threshold = flow;
  const cellprob = numberOrNull("seg-cellprob");
  if (cellprob !== null) request.params.cellprob_threshold = cellprob;
  const minSize = numberOrNull("seg-min-size");
  if (minSize !== null) request.params.min_size = minSize;
  return {request, files};
}

async function onSegmentSubmit(event) {
  event.preventDefault();
  clearNotice();
  const button = $("seg-submit");
  try {
    const {request, files} = buildSegmentRequest();
    const form = new FormData();
    form.append("request", JSON.stringify(request));
    for (const file of files) form.append("files", file, file.name);
    button.disabled = true;
    $("seg-state").textContent = `uploading ${files.length} file(s)…`;
    const job = await api("/api/v1/jobs/segment", {method: "POST", form});
    $("seg-state").textContent = "";
    showNotice("Segmentation started", `job ${job.id.slice(0, 8)}; follow it on the Jobs tab`, "info");
    state.selectedJobId = job.id;
    state.detailSignature = "";
    showTab("jobs");
  } catch (error) {
    $("seg-state").textContent = "";
    showError(error);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Jobs: list, live progress, cancel, results

function schedulePoll(delay = null) {
  if (state.pollTimer) clearTimeout(state.pollTimer);
  const anyActive = state.jobs.some((j) => ACTIVE.has(j.status));
  const wait = delay !== null ? delay : (anyActive || state.tab === "jobs" ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  state.pollTimer = setTimeout(async () => {
    if (state.key && !document.hidden) {
      try {
        await pollJobs();
      } catch (error) {
        if (error instanceof ApiError && error.status === 401) showError(error);
      }
    }
    schedulePoll();
  }, wait);
}

async function pollJobs() {
  const page = await api("/api/v1/jobs?limit=30");
  state.jobs = page.items;
  renderJobs();
  if (state.selectedJobId) {
    let job = state.jobs.find((j) => j.id === state.selectedJobId);
    if (!job) job = await api(`/api/v1/jobs/${encodeURIComponent(state.selectedJobId)}`);
    renderJobDetail(job);
  }
}

function statusBadge(job) {
  const label = job.status === "running" && job.cancel_requested ? "cancelling" : job.status;
  return el("span", {class: `badge ${job.status}`}, label);
}

function progressBar(job) {
  const percent = Math.round(100 * (job.status === "succeeded" ? 1 : Math.max(0, Math.min(1, job.progress || 0))));
  return el("div", {class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
    "aria-valuenow": percent, title: job.stage || ""},
  el("div", {class: `bar ${job.status}`, style: `width:${percent}%`}),
  el("span", {class: "progress-text"}, `${percent}%${job.stage ? ` · ${job.stage}` : ""}`));
}

function renderJobs() {
  const signature = JSON.stringify(state.jobs.map((j) => [j.id, j.status, j.progress, j.stage, j.cancel_requested,
    state.selectedJobId === j.id]));
  if (signature === state.jobsSignature) return;
  state.jobsSignature = signature;
  const rows = state.jobs.map((job) => {
    const canCancel = ACTIVE.has(job.status) && !job.cancel_requested;
    const row = el("tr", {class: `job-row${job.id === state.selectedJobId ? " selected" : ""}`, "data-job": job.id,
      onclick: () => selectJob(job.id)},
    el("td", {}, el("button", {type: "button", class: "link", title: job.id}, job.id.slice(0, 8))),
    el("td", {}, KIND_NAMES[job.kind] || job.kind),
    el("td", {}, statusBadge(job)),
    el("td", {class: "progress-cell"}, progressBar(job),
      job.error ? el("div", {class: "job-error"}, job.error) : null),
    el("td", {}, fmtTime(job.created_at)),
    el("td", {}, canCancel ? el("button", {type: "button", class: "secondary small cancel",
      onclick: (event) => { event.stopPropagation(); cancelJob(job.id); }}, "Cancel") : null));
    return row;
  });
  fillTable($("jobs-body"), rows, "No jobs yet.", 6);
}

function selectJob(jobId) {
  state.selectedJobId = jobId;
  state.detailSignature = "";
  state.jobsSignature = "";
  pollJobs().catch(showError);
}

async function cancelJob(jobId) {
  try {
    const job = await api(`/api/v1/jobs/${encodeURIComponent(jobId)}/cancel`, {method: "POST"});
    showNotice("Cancel requested", job.status === "cancelled" ? "the job was cancelled"
      : "the job stops at its next checkpoint", "info");
    state.jobsSignature = "";
    await pollJobs();
  } catch (error) {
    showError(error);
  }
}

/** A result file fetched with the key, as an object URL (cached: results never change). */
async function resultBlobUrl(result) {
  const cacheKey = `${result.url}#${result.sha256}`;
  if (!state.blobUrls.has(cacheKey)) {
    const response = await api(result.url, {raw: true});
    state.blobUrls.set(cacheKey, URL.createObjectURL(await response.blob()));
  }
  return state.blobUrls.get(cacheKey);
}

async function download(result) {
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

const COUNT_KEYS = new Set(["tp", "fp", "fn"]);
const METRIC_COLUMNS = [["f1", "F1"], ["precision", "Precision"], ["recall", "Recall"], ["jaccard", "Jaccard"],
  ["map_50_95", "mAP .5:.95"], ["tp", "TP"], ["fp", "FP"], ["fn", "FN"]];

function metricsTable(rowsByName, firstHeader) {
  const head = el("tr", {}, el("th", {}, firstHeader), METRIC_COLUMNS.map(([, label]) => el("th", {}, label)));
  const body = Object.entries(rowsByName).map(([name, m]) => el("tr", {}, el("td", {}, name),
    METRIC_COLUMNS.map(([key]) => el("td", {class: "num"}, COUNT_KEYS.has(key) ? fmt(m[key]) : fmtScore(m[key])))));
  return el("table", {class: "list metrics-table"}, el("thead", {}, head), el("tbody", {}, body));
}

function detailSection(title, ...content) {
  return el("div", {class: "detail-section"}, el("h4", {}, title), ...content);
}

function renderJobDetail(job) {
  const panel = $("job-detail");
  const signature = JSON.stringify([job.id, job.status, job.progress, job.stage, job.error, job.results.length,
    job.cancel_requested]);
  if (signature === state.detailSignature) return;
  state.detailSignature = signature;
  panel.hidden = false;
  const p = job.params || {};
  const s = job.summary || {};
  const parts = [];
  parts.push(el("h3", {}, `${KIND_NAMES[job.kind] || job.kind} ${job.id.slice(0, 8)} `, statusBadge(job)));
  const facts = [];
  if (p.cell_line) facts.push(["Cell line", p.cell_line]);
  if (p.method) facts.push(["Method", METHOD_NAMES[p.method] || p.method]);
  if (p.channels) facts.push(["Channels", p.channels.join(", ")]);
  if (s.fused_channels) {
    facts.push(["Fused", Object.entries(s.fused_channels).map(([o, c]) => `${o}: ${c.join(" + ")}`).join("; ")]);
  }
  if (p.reporter) facts.push(["Reporter", `${p.reporter} (${p.object})`]);
  if (p.fields) facts.push(["Fields", String(p.fields.length)]);
  facts.push(["Submitted", fmtTime(job.created_at)]);
  if (job.finished_at) facts.push(["Finished", fmtTime(job.finished_at)]);
  parts.push(el("dl", {class: "facts"}, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));
  parts.push(progressBar(job));
  if (job.error) parts.push(el("p", {class: "job-error"}, `This job ${job.status === "cancelled" ? "was cancelled" : "failed"}: ${job.error}`));

  // Per-field counts and timings (segmentation).
  if (Array.isArray(s.fields) && s.fields.length) {
    const objects = [...new Set(s.fields.flatMap((f) => Object.keys(f.objects || {})))];
    const head = el("tr", {}, el("th", {}, "Field"), el("th", {}, "Well"),
      objects.map((o) => el("th", {}, `${o} found`)), el("th", {}, "Seconds"));
    const rows = s.fields.map((f) => el("tr", {}, el("td", {}, f.field), el("td", {}, f.well || "–"),
      objects.map((o) => el("td", {class: "num"}, fmt((f.objects || {})[o]))), el("td", {class: "num"}, fmt(f.seconds, 2))));
    for (const failed of s.failed_fields || []) {
      rows.push(el("tr", {class: "failed"}, el("td", {}, failed.field),
        el("td", {colspan: objects.length + 2, class: "job-error"}, `failed: ${failed.error}`)));
    }
    parts.push(detailSection("Fields", el("table", {class: "list fields-table"}, el("thead", {}, head), el("tbody", {}, rows))));
  }
  // Metrics: pooled per object (segmentation of a dataset) or one set (evaluation, fine-tuning).
  const metrics = s.metrics || s.test_metrics;
  if (metrics && Object.keys(metrics).length) {
    const rowsByName = "f1" in metrics ? {[p.object || "all"]: metrics} : metrics;
    parts.push(detailSection("Accuracy against the annotations (match at IoU ≥ 0.5)", metricsTable(rowsByName, "Object")));
  }
  if (Array.isArray(s.ranking) && s.ranking.length) {
    parts.push(detailSection(`Channel subsets (chosen: ${(s.chosen || []).join(" + ")})`, rankingTable(s.ranking, s.chosen)));
  }
  if (Array.isArray(s.training_curve) && s.training_curve.length) {
    parts.push(detailSection("Training curve", trainingCurveSvg(s.training_curve, s.best_epoch)));
  }
  // Overlay previews, fetched with the key.
  const overlays = job.results.filter((r) => r.kind === "overlay");
  if (overlays.length) {
    const gallery = el("div", {class: "gallery"});
    for (const result of overlays) {
      const img = el("img", {class: "overlay", alt: `overlay of ${(result.meta || {}).field || result.name}`});
      gallery.append(el("figure", {}, img, el("figcaption", {}, (result.meta || {}).field || result.name)));
      resultBlobUrl(result).then((url) => { img.src = url; }).catch(showError);
    }
    parts.push(detailSection("Previews (nuclei and cell outlines over the image)", gallery));
  }
  if (job.results.length) {
    const rows = job.results.map((r) => el("tr", {},
      el("td", {}, el("a", {href: "#", class: "download", "data-name": r.name,
        onclick: (event) => { event.preventDefault(); download(r); }}, r.name)),
      el("td", {}, r.kind.replaceAll("_", " ")), el("td", {class: "num"}, fmtBytes(r.size_bytes))));
    parts.push(detailSection("Downloads", el("table", {class: "list downloads"},
      el("thead", {}, el("tr", {}, el("th", {}, "File"), el("th", {}, "What"), el("th", {}, "Size"))),
      el("tbody", {}, rows))));
  }
  panel.replaceChildren(...parts);
}

// ---------------------------------------------------------------------------------------------
// Zoo

function rankingTable(ranking, chosen) {
  const chosenKey = JSON.stringify(chosen || []);
  const head = el("tr", {}, el("th", {}, "Channels"), ["F1", "Precision", "Recall", "Jaccard", "mAP .5:.95"].map((h) => el("th", {}, h)));
  const rows = ranking.map((r) => el("tr", {class: JSON.stringify(r.channels) === chosenKey ? "chosen" : ""},
    el("td", {}, (r.channels || []).join(" + ")),
    ["f1", "precision", "recall", "jaccard", "map_50_95"].map((k) => el("td", {class: "num"}, fmtScore(r[k])))));
  return el("table", {class: "list ranking"}, el("thead", {}, head), el("tbody", {}, rows));
}

async function loadZoo() {
  const [cellLines, reporters, versions, aliases, channelSets] = await Promise.all([
    api("/api/v1/cell-lines"), api("/api/v1/reporters"), api("/api/v1/models"), api("/api/v1/aliases"),
    api("/api/v1/channel-sets")]);
  state.versions = versions;
  fillTable($("cell-lines-body"), cellLines.map((c) => el("tr", {}, el("td", {}, c.name), el("td", {}, c.species || "–"),
    el("td", {}, c.tissue || "–"))), "No cell lines yet.", 3);
  fillTable($("reporters-body"), reporters.map((r) => el("tr", {}, el("td", {}, r.name), el("td", {}, r.fluorophore || "–"),
    el("td", {}, r.protein || "–"), el("td", {}, r.localisation || "–"))), "No reporters yet.", 4);
  fillTable($("versions-body"), versions.map((v) => {
    const m = v.test_metrics || {};
    return el("tr", {class: `version-row${v.id === state.selectedVersionId ? " selected" : ""}`, "data-version": v.id,
      onclick: () => selectVersion(v.id)},
    el("td", {}, v.id), el("td", {}, v.cell_line), el("td", {}, v.reporter), el("td", {}, v.object),
    el("td", {class: "num"}, v.version), el("td", {}, el("span", {class: `badge ${v.status}`}, v.status),
      v.pseudo_labelled ? el("span", {class: "badge pseudo", title: "trained on self-training pseudo-labels: "
        + "no human annotation"}, "pseudo-labelled") : null),
    el("td", {class: "num"}, fmtScore(m.f1)), el("td", {class: "num"}, fmtScore(m.precision)),
    el("td", {class: "num"}, fmtScore(m.recall)),
    el("td", {class: "num"}, fmt(v.diameter, 1)), el("td", {}, v.aliases.join(", ") || "–"),
    el("td", {}, v.base_model || (v.parent_version_id ? `version #${v.parent_version_id}` : "–")));
  }), "No model versions yet: fine-tune one.", 12);
  fillTable($("aliases-body"), aliases.map((a) => el("tr", {}, el("td", {}, a.cell_line), el("td", {}, a.reporter),
    el("td", {}, a.object), el("td", {}, a.alias), el("td", {}, `v${a.version} (#${a.version_id})`),
    el("td", {class: "num"}, a.history.length))), "No aliases yet.", 6);
  const sets = $("channel-sets");
  sets.replaceChildren();
  if (!channelSets.length) sets.append(el("p", {class: "muted"}, "No channel set chosen yet (segmentation then fuses every channel)."));
  // Newest first from the API; show the current choice per (cell line, object) only.
  const seen = new Set();
  for (const cs of channelSets) {
    const key = `${cs.cell_line}\u0001${cs.object}`;
    if (seen.has(key)) continue;
    seen.add(key);
    sets.append(el("div", {class: "channel-set"},
      el("h4", {}, `${cs.cell_line} · ${cs.object}: `, el("strong", {}, cs.chosen.join(" + ")),
        el("span", {class: "muted"}, ` (${METHOD_NAMES[cs.method] || cs.method}${cs.job_id ? "" : ", chosen by hand"})`)),
      cs.ranking.length ? rankingTable(cs.ranking, cs.chosen) : null));
  }
  const withCurve = versions.filter((v) => v.training_curve && v.training_curve.length);
  if (!versions.some((v) => v.id === state.selectedVersionId) && withCurve.length) {
    state.selectedVersionId = withCurve[0].id;
    for (const row of document.querySelectorAll(".version-row")) {
      row.classList.toggle("selected", Number(row.dataset.version) === state.selectedVersionId);
    }
  }
  renderCurve();
}

function selectVersion(id) {
  state.selectedVersionId = id;
  for (const row of document.querySelectorAll(".version-row")) {
    row.classList.toggle("selected", Number(row.dataset.version) === id);
  }
  renderCurve();
}

function renderCurve() {
  const version = state.versions.find((v) => v.id === state.selectedVersionId);
  const panel = $("curve-panel");
  if (!version) {
    panel.hidden = true;
    return;
  }
  panel.hidden = false;
  $("curve-title").textContent = `Training curve of ${version.cell_line} · ${version.reporter} · ${version.object} v${version.version}`;
  const best = ((version.card || {}).training || {}).best_epoch;
  $("curve").replaceChildren(version.training_curve.length
    ? trainingCurveSvg(version.training_curve, best)
    : el("p", {class: "muted"}, version.status === "training" ? "training has just started…" : "no curve recorded"));
}

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

/** Round tick values between lo and hi, and the decimals that print them all alike. */
function niceTicks(lo, hi, count = 5) {
  if (hi <= lo) return Object.assign([lo], {decimals: 2});
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(10)));
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9) + (step / magnitude === 2.5 ? 1 : 0)));
  return Object.assign(ticks, {decimals});
}

/** Train and validation loss per epoch as an inline SVG line chart. */
function trainingCurveSvg(curve, bestEpoch = null) {
  const width = 640, height = 260, left = 56, right = 16, top = 16, bottom = 40;
  const points = curve.filter((c) => Number.isFinite(c.epoch));
  const series = [["train_loss", "training loss", "series-train"], ["val_loss", "validation loss", "series-val"]];
  const values = points.flatMap((c) => series.map(([k]) => c[k]).filter((v) => typeof v === "number" && Number.isFinite(v)));
  const root = svg("svg", {viewBox: `0 0 ${width} ${height}`, class: "curve", role: "img",
    "aria-label": `training curve over ${points.length} epoch(s)`});
  if (!values.length) return root;
  const epochs = points.map((c) => c.epoch);
  let [x0, x1] = [Math.min(...epochs), Math.max(...epochs)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  let [y0, y1] = [Math.min(...values), Math.max(...values)];
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
  y0 -= pad; y1 += pad;
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  const axes = svg("g", {class: "axes"});
  const yTicks = niceTicks(y0, y1);
  for (const t of yTicks) {
    axes.append(svg("line", {x1: left, x2: width - right, y1: sy(t), y2: sy(t), class: "grid"}));
    axes.append(svg("text", {x: left - 6, y: sy(t) + 4, "text-anchor": "end"}, t.toFixed(yTicks.decimals)));
  }
  for (const t of niceTicks(x0, x1, Math.min(8, Math.max(1, x1 - x0))).filter((t) => Number.isInteger(t))) {
    axes.append(svg("line", {x1: sx(t), x2: sx(t), y1: height - bottom, y2: height - bottom + 5, class: "tick"}));
    axes.append(svg("text", {x: sx(t), y: height - bottom + 18, "text-anchor": "middle"}, String(t)));
  }
  axes.append(svg("line", {x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis"}));
  axes.append(svg("line", {x1: left, x2: left, y1: top, y2: height - bottom, class: "axis"}));
  axes.append(svg("text", {x: (left + width - right) / 2, y: height - 4, "text-anchor": "middle"}, "epoch"));
  axes.append(svg("text", {x: 14, y: (top + height - bottom) / 2, "text-anchor": "middle",
    transform: `rotate(-90 14 ${(top + height - bottom) / 2})`}, "loss"));
  root.append(axes);
  if (Number.isFinite(bestEpoch) && bestEpoch >= x0 && bestEpoch <= x1) {
    root.append(svg("line", {x1: sx(bestEpoch), x2: sx(bestEpoch), y1: top, y2: height - bottom, class: "best"}));
    root.append(svg("text", {x: sx(bestEpoch) + 4, y: top + 12, class: "best-label"}, "best"));
  }
  series.forEach(([key, label, cls], index) => {
    const pts = points.filter((c) => typeof c[key] === "number" && Number.isFinite(c[key]));
    if (!pts.length) return;
    root.append(svg("polyline", {class: `line ${cls}`, points: pts.map((c) => `${sx(c.epoch)},${sy(c[key])}`).join(" ")}));
    for (const c of pts) root.append(svg("circle", {class: `dot ${cls}`, cx: sx(c.epoch), cy: sy(c[key]), r: 3}));
    const lx = width - right - 150, ly = top + 6 + index * 18;
    root.append(svg("line", {x1: lx, x2: lx + 20, y1: ly, y2: ly, class: `line ${cls}`}));
    root.append(svg("text", {x: lx + 26, y: ly + 4, class: "legend"}, label));
  });
  return root;
}

// ---------------------------------------------------------------------------------------------
// Fine-tune form

async function loadTrainForm() {
  const [datasets, bases, versions] = await Promise.all([api("/api/v1/datasets"), api("/api/v1/base-models"),
    api("/api/v1/models?status=ready")]);
  state.datasets = datasets;
  const select = $("ft-dataset");
  const previous = select.value;
  select.replaceChildren(...(datasets.length
    ? datasets.map((d) => el("option", {value: d.id}, `#${d.id} ${d.name} (${d.cell_line}, ${d.images.length} images)`))
    : [el("option", {value: ""}, "no datasets yet")]));
  if (datasets.some((d) => String(d.id) === previous)) select.value = previous;
  renderTrainReporters();
  const base = $("ft-base");
  const previousBase = base.value;
  base.replaceChildren(el("option", {value: ""}, "the shipped base model"),
    bases.map((b) => el("option", {value: b.name}, `base model ${b.name}`)),
    versions.map((v) => el("option", {value: `version:${v.id}`},
      `zoo version #${v.id}: ${v.cell_line} · ${v.reporter} · ${v.object} v${v.version}`)));
  if ([...base.options].some((o) => o.value === previousBase)) base.value = previousBase;
}

function renderTrainReporters() {
  const ds = state.datasets.find((d) => String(d.id) === $("ft-dataset").value);
  const select = $("ft-reporter");
  const previous = select.value;
  select.replaceChildren(...(ds ? ds.channels.map((c, i) => el("option", {value: c}, `${c} (channel ${i + 1})`)) : []));
  if (ds && ds.channels.includes(previous)) select.value = previous;
}

async function onFinetuneSubmit(event) {
  event.preventDefault();
  clearNotice();
  try {
    const datasetId = Number($("ft-dataset").value);
    if (!datasetId) throw new ApiError("No dataset", "upload an annotated dataset first (see the API documentation)");
    const body = {dataset_id: datasetId, reporter: $("ft-reporter").value, object: $("ft-object").value,
      base: $("ft-base").value, params: {max_epochs: Number($("ft-max-epochs").value) || 200}};
    $("ft-submit").disabled = true;
    const job = await api("/api/v1/jobs/finetune", {method: "POST", json: body});
    showNotice("Fine-tuning started", `job ${job.id.slice(0, 8)}; follow it on the Jobs tab`, "info");
    state.selectedJobId = job.id;
    state.detailSignature = "";
    showTab("jobs");
  } catch (error) {
    showError(error);
  } finally {
    $("ft-submit").disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Start

function init() {
  for (const button of document.querySelectorAll(".tabs [role=tab]")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey($("api-key").value);
    if (state.key) onKeySaved();
  });
  $("key-forget").addEventListener("click", () => { setKey(""); clearNotice(); });
  $("notice-close").addEventListener("click", clearNotice);
  $("seg-files").addEventListener("change", onFilesChosen);
  $("seg-n-channels").addEventListener("change", () => renderChannelRows());
  $("seg-zoo-channels").addEventListener("change", () => renderChannelRows());
  $("segment-form").addEventListener("submit", onSegmentSubmit);
  $("finetune-form").addEventListener("submit", onFinetuneSubmit);
  $("ft-dataset").addEventListener("change", renderTrainReporters);
  $("jobs-refresh").addEventListener("click", () => { state.jobsSignature = ""; state.detailSignature = ""; pollJobs().catch(showError); });
  $("zoo-refresh").addEventListener("click", () => loadZoo().catch(showError));
  document.addEventListener("visibilitychange", () => { if (!document.hidden) schedulePoll(0); });
  setKey(localStorage.getItem(KEY_STORAGE) || "");
  renderChannelRows();
  if (state.key) onKeySaved();
  else showNotice("Welcome", "enter your API key at the top of the page to start", "info");
}

document.addEventListener("DOMContentLoaded", init);
