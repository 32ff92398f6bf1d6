// The Segment tab: choose TIFF files, say which reporter is in each channel, see which model each
// channel will use, and submit. The TIFF header is read in the browser (a few small slices only).
import {$, EXPLAIN, WEAK_F1, el, fmtBytes, fmtScore, setOptions} from "./dom.js";
import {ApiError, api, clearNotice, showError, showNotice} from "./api.js";
import {state} from "./state.js";
import {channelThumbnails} from "./thumbnails.js";

/** What a TIFF says about its channels: OME-XML channel names, ImageJ's channels=, tifffile's JSON
 *  shape, samples per pixel, or else the number of pages (a plain multi-page TIFF is one page per
 *  channel). -> {count, names} or null when it is not a TIFF. */
export async function readTiffChannels(file) {
  const read = async (offset, length) => new DataView(await file.slice(offset, offset + length).arrayBuffer());
  if (file.size < 16) return null;
  const header = await read(0, 16);
  const order = String.fromCharCode(header.getUint8(0), header.getUint8(1));
  if (order !== "II" && order !== "MM") return null;
  const le = order === "II";
  const magic = header.getUint16(2, le);
  if (magic !== 42 && magic !== 43) return null;
  const big = magic === 43;
  const entrySize = big ? 20 : 12;
  let ifd = big ? Number(header.getBigUint64(8, le)) : header.getUint32(4, le);
  let description = "";
  let samples = 1;
  let pages = 0;
  let firstSize = null;
  let sameSizePages = 0;
  const seen = new Set();
  // Walk the chain of image directories (at most 64: enough to count channels, cheap to read).
  while (ifd && ifd < file.size && !seen.has(ifd) && pages < 64) {
    seen.add(ifd);
    const countView = await read(ifd, big ? 8 : 2);
    const nEntries = Math.min(big ? Number(countView.getBigUint64(0, le)) : countView.getUint16(0, le), 512);
    const entries = await read(ifd + (big ? 8 : 2), nEntries * entrySize + (big ? 8 : 4));
    let width = 0, height = 0;
    for (let i = 0; i < nEntries; i += 1) {
      const at = i * entrySize;
      if (at + entrySize > entries.byteLength) break;
      const tag = entries.getUint16(at, le);
      const type = entries.getUint16(at + 2, le);
      const count = big ? Number(entries.getBigUint64(at + 4, le)) : entries.getUint32(at + 4, le);
      const valueAt = at + (big ? 12 : 8);
      const short = () => (type === 3 ? entries.getUint16(valueAt, le) : entries.getUint32(valueAt, le));
      if (tag === 256) width = short();
      if (tag === 257) height = short();
      if (pages === 0 && tag === 277 && type === 3) samples = entries.getUint16(valueAt, le);
      if (pages === 0 && tag === 270 && type === 2 && count > 0 && count < 4 * 1024 * 1024) {
        const inline = count <= (big ? 8 : 4);
        const bytes = inline
          ? new Uint8Array(entries.buffer, entries.byteOffset + valueAt, count)
          : new Uint8Array((await read(big ? Number(entries.getBigUint64(valueAt, le)) : entries.getUint32(valueAt, le),
            count)).buffer);
        description = new TextDecoder("utf-8").decode(bytes).replace(/\0+$/, "");
      }
    }
    const size = `${width}x${height}`;
    if (firstSize === null) firstSize = size;
    if (size === firstSize) sameSizePages += 1;
    pages += 1;
    const nextAt = nEntries * entrySize;
    if (nextAt + (big ? 8 : 4) > entries.byteLength) break;
    ifd = big ? Number(entries.getBigUint64(nextAt, le)) : entries.getUint32(nextAt, le);
  }
  const unescape = (s) => s.replace(/&quot;/g, '"').replace(/&apos;/g, "'").replace(/&lt;/g, "<")
    .replace(/&gt;/g, ">").replace(/&amp;/g, "&");
  const names = [...description.matchAll(/<Channel\b[^>]*?\bName="([^"]*)"/g)].map((m) => unescape(m[1]));
  if (names.length) return {count: names.length, names};
  const sizeC = description.match(/\bSizeC="(\d+)"/) || description.match(/\bchannels=(\d+)/);
  if (sizeC) return {count: Number(sizeC[1]), names: []};
  const shape = description.match(/^\s*\{\s*"shape":\s*\[([\d,\s]+)\]/);
  if (shape) {
    const dims = shape[1].split(",").map(Number);
    if (dims.length === 3 && dims[0] <= 8) return {count: dims[0], names: []};
    if (dims.length === 3 && dims[2] <= 8) return {count: dims[2], names: []};
    if (dims.length === 2) return {count: 1, names: []};
  }
  if (samples > 1) return {count: samples, names: []};
  if (pages > 1 && sameSizePages === pages && pages <= 8) return {count: pages, names: []};
  if (pages === 1) return {count: 1, names: []};
  return {count: null, names: []};
}

function channelNamesFromFile() {
  return ($("seg-channels").dataset.fileNames || "").split("\u0001").filter((s) => s !== "");
}

/** The table of channels: reporter and "fuse" per channel. An unticked channel may stay without a
 *  reporter (it is then only carried along, under the name the file gives it). */
export function renderChannelRows(fileNames = null) {
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
      el("option", {value: ""}, "— not a registered reporter —"),
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
      el("td", {class: "thumb-cell"}),
      el("td", {}, select), el("td", {}, fuse), el("td", {class: "plan", "data-plan": i}, "")));
  }
  schedulePlan();
}

/** Well and field from an HCS-style file name, when it starts with the well:
 *  "B02-field1.ome.tif" -> {well: "B02", field: 1}; "B02_s3_w1.tif" -> {well: "B02", field: 3};
 *  "r02c03f01p01-ch1.tiff" -> {well: "B03", field: 1}; anything else -> null (the server then
 *  names fields F001, F002, ...). */
export function wellFromName(name) {
  const operetta = name.match(/^r(\d{2})c(\d{2})f(\d{2,3})/i);
  if (operetta && Number(operetta[1]) >= 1 && Number(operetta[1]) <= 26) {
    return {well: String.fromCharCode(64 + Number(operetta[1])) + operetta[2], field: Number(operetta[3])};
  }
  const well = name.match(/^([A-Za-z]{1,2}\d{1,3})(?=[^0-9]|$)/);
  if (!well) return null;
  const field = name.slice(well[1].length).match(/(?:field|fld|_s|-s|_f|-f)(\d{1,4})(?!\d)/i);
  return {well: well[1].toUpperCase(), field: field ? Number(field[1]) : null};
}

/** Every chosen file checked in the browser: TIFF or not, channel count, well. -> rows for the list. */
async function checkFiles(files) {
  const rows = [];
  for (const file of files.slice(0, 400)) {
    let found = null;
    try {
      found = await readTiffChannels(file);
    } catch (_ignored) {
      found = null;
    }
    rows.push({file, found, well: wellFromName(file.name)});
  }
  return rows;
}

async function onFilesChosen() {
  const files = [...$("seg-files").files];
  const info = $("seg-file-info");
  const list = $("seg-file-list");
  list.replaceChildren();
  if (!files.length) {
    info.textContent = "";
    return;
  }
  const total = files.reduce((n, f) => n + f.size, 0);
  let text = `${files.length} file(s), ${fmtBytes(total)}.`;
  const checked = await checkFiles(files);
  const first = checked[0].found;
  if (first === null) {
    text += ` ${files[0].name} does not look like a TIFF file; the server will check it.`;
    renderChannelRows([]);
  } else if (first.count) {
    $("seg-n-channels").value = String(Math.min(8, first.count));
    text += ` ${files[0].name} has ${first.count} channel(s)` + (first.names.length ? `: ${first.names.join(", ")}.` : ".");
    renderChannelRows(first.names);
  } else {
    text += " The number of channels could not be read from the file; set it below.";
    renderChannelRows([]);
  }
  info.textContent = text;
  showThumbnails(files[0], first && first.count ? first.count : 0).catch(() => {});
  const count = first && first.count;
  const problems = checked.filter((c) => c.found === null || (count && c.found.count && c.found.count !== count));
  list.append(el("table", {class: "list files-checked"},
    el("thead", {}, el("tr", {}, el("th", {}, "File"), el("th", {}, "Size"), el("th", {}, "Channels"),
      el("th", {}, "Well / field"), el("th", {}, "Check"))),
    el("tbody", {}, checked.slice(0, 50).map((c) => {
      const bad = c.found === null ? "not a TIFF" : count && c.found.count && c.found.count !== count
        ? `${c.found.count} channels, not ${count}` : null;
      return el("tr", {class: bad ? "failed" : ""}, el("td", {}, c.file.name), el("td", {class: "num"}, fmtBytes(c.file.size)),
        el("td", {class: "num"}, c.found && c.found.count ? c.found.count : "?"),
        el("td", {}, c.well ? `${c.well.well}${c.well.field ? ` / ${c.well.field}` : ""}` : "–"),
        el("td", {class: bad ? "job-error" : "ok-text"}, bad || "ok"));
    }))));
  if (checked.length > 50) list.append(el("p", {class: "muted"}, `… and ${checked.length - 50} more file(s).`));
  if (problems.length) {
    list.append(el("p", {class: "job-error"}, `${problems.length} file(s) need a look before submitting.`));
  }
}

/** Each channel of the first file as a small grey picture, in the channel table's rows. */
async function showThumbnails(file, count) {
  const cells = [...document.querySelectorAll("#seg-channels td.thumb-cell")];
  for (const cell of cells) cell.replaceChildren();
  if (!count) return;
  const thumbs = await channelThumbnails(file, count);
  if (typeof thumbs === "string") {
    if (cells[0]) cells[0].append(el("span", {class: "muted small-text"}, thumbs));
    return;
  }
  thumbs.forEach((canvas, i) => {
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `channel ${i + 1} of ${file.name}`);
    if (cells[i]) cells[i].append(canvas);
  });
}

// ---------------------------------------------------------------------------------------------
// Before submit: the model each channel will use, with its F1 (debounced: the form changes often).

let planTimer = null;

export function schedulePlan() {
  if (planTimer) clearTimeout(planTimer);
  planTimer = setTimeout(() => showPlan().catch(() => {}), 250);
}

async function showPlan() {
  const cellLine = $("seg-cell-line").value;
  const cells = [...document.querySelectorAll("#seg-channels td.plan")];
  const channels = [...document.querySelectorAll("#seg-channels select")].map((s) => s.value);
  const named = channels.filter((c) => c);
  if (!state.key || !cellLine || !named.length) {
    for (const cell of cells) cell.textContent = "";
    return;
  }
  const alias = $("seg-alias").value || "production";
  const objects = [...document.querySelectorAll("#segment-form input[name=objects]:checked")].map((c) => c.value);
  const byObject = {};
  for (const obj of objects) {
    byObject[obj] = await api(`/api/v1/resolve?cell_line=${encodeURIComponent(cellLine)}` +
      `&channels=${encodeURIComponent(named.join(","))}&object=${obj}&alias=${encodeURIComponent(alias)}`);
  }
  if (!state.versions.length) state.versions = await api("/api/v1/models");
  cells.forEach((cell, i) => {
    const name = channels[i];
    cell.replaceChildren();
    if (!name) {
      cell.append(el("span", {class: "muted"}, "no model (leave it unticked)"));
      return;
    }
    for (const obj of objects) {
      const hit = byObject[obj].models[name];
      if (!hit) {
        cell.append(el("div", {class: "job-error"}, `${obj}: no model — untick this channel or fine-tune one`));
        continue;
      }
      const version = state.versions.find((v) => v.id === hit.version_id);
      const f1 = version && version.test_metrics ? version.test_metrics.f1 : null;
      const weak = typeof f1 === "number" && f1 < WEAK_F1;
      cell.append(el("div", {class: weak ? "warn-text" : ""}, `${obj}: v${hit.version} (#${hit.version_id}, ${hit.how})`,
        el("abbr", {title: EXPLAIN.f1}, ` F1 ${fmtScore(f1)}`), weak ? " — weak model" : ""));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Submit

function numberOrNull(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

/** The form's own checks (min, max, required) with the Advanced panel opened on the first bad field:
 *  the browser's built-in check cannot focus a field inside a closed <details> and gives up silently. */
function checkFormFields(form) {
  for (const control of form.elements) {
    if (typeof control.checkValidity !== "function" || control.checkValidity()) continue;
    const details = control.closest("details");
    if (details) details.open = true;
    const label = control.closest("label");
    const what = label ? label.firstChild.textContent.trim() : control.name || control.id;
    control.focus();
    throw new ApiError("Check this value", `${what}: ${control.validationMessage}`);
  }
}

export function buildSegmentRequest() {
  checkFormFields($("segment-form"));
  const files = [...$("seg-files").files];
  if (!files.length) throw new ApiError("No image chosen", "choose at least one TIFF file to segment");
  const cellLine = $("seg-cell-line").value;
  if (!cellLine) throw new ApiError("No cell line", "register a cell line in the zoo first, then choose it here");
  const chosen = [...$("seg-channels").querySelectorAll("select")].map((s) => s.value);
  const fuse = [...$("seg-channels").querySelectorAll("input[data-fuse]")].map((c) => c.checked);
  const zooChooses = $("seg-zoo-channels").checked;
  const fileNames = channelNamesFromFile();
  // A channel without a reporter is fine when it is not fused: it goes under the file's name for it.
  const model = $("seg-model").value;
  // A base model needs no registered reporter: unnamed channels go under the file's names.
  const missing = model !== "zoo" ? [] :
    chosen.map((c, i) => (c || (!zooChooses && !fuse[i]) ? null : i + 1)).filter((i) => i !== null);
  if (missing.length) {
    throw new ApiError("Channels without a reporter", `choose the reporter of channel(s) ${missing.join(", ")}` +
      (zooChooses ? ", or untick 'let the zoo choose' and leave those channels unticked" : ", or untick them"));
  }
  const channels = chosen.map((c, i) => c || fileNames[i] || `channel-${i + 1}`);
  const repeated = channels.filter((c, i) => channels.indexOf(c) !== i);
  if (repeated.length) throw new ApiError("A reporter is used twice", `each channel needs its own reporter (${[...new Set(repeated)].join(", ")} appears more than once)`);
  const objects = [...document.querySelectorAll("#segment-form input[name=objects]:checked")].map((c) => c.value);
  if (!objects.length) throw new ApiError("Nothing to find", "tick nuclei, whole cells, or both");
  const request = {cell_line: cellLine, channels, objects, method: $("seg-method").value,
    alias: $("seg-alias").value || "production", model,
    params: {estimate_diameter: $("seg-estimate-diameter").value}};
  if (!zooChooses) {
    const use = channels.filter((_c, i) => fuse[i]);
    if (!use.length) throw new ApiError("No channel to fuse", "tick at least one channel to fuse");
    request.use_channels = use;
  }
  const wells = files.map((f) => wellFromName(f.name));
  if (wells.every((w) => w !== null)) request.fields = wells;
  const plate = $("seg-plate").value.trim();
  if (plate) request.plate = plate;
  for (const [id, key] of [["seg-diameter", "diameter"], ["seg-flow-threshold", "flow_threshold"],
    ["seg-cellprob", "cellprob_threshold"], ["seg-min-size", "min_size"]]) {
    const value = numberOrNull(id);
    if (value !== null) request.params[key] = value;
  }
  return {request, files};
}

async function onSegmentSubmit(event, onSubmitted) {
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
    showNotice("Segmentation started", `job ${job.id.slice(0, 8)}; its page shows the progress`, "info");
    onSubmitted(job.id);
  } catch (error) {
    $("seg-state").textContent = "";
    showError(error);
  } finally {
    button.disabled = false;
  }
}

/** Cell lines, reporters and aliases for the form (also used by other tabs). */
export async function loadReference() {
  const [cellLines, reporters, aliases] = await Promise.all([api("/api/v1/cell-lines"), api("/api/v1/reporters"),
    api("/api/v1/aliases")]);
  state.cellLines = cellLines;
  state.reporters = reporters;
  state.aliases = aliases;
  setOptions($("seg-cell-line"), cellLines.length
    ? cellLines.map((c) => el("option", {value: c.name}, c.name))
    : [el("option", {value: ""}, "no cell lines registered")]);
  // The alias is a list, not free text: a misspelt alias would silently fall back to the newest models.
  const names = [...new Set(["production", ...aliases.map((a) => a.alias)])];
  setOptions($("seg-alias"), names.map((n) => el("option", {value: n},
    n === "production" ? "production (recommended)" : n)), "production");
  renderChannelRows();
}

export function initSegment(onSubmitted) {
  $("seg-files").addEventListener("change", () => onFilesChosen().catch(showError));
  $("seg-n-channels").addEventListener("change", () => renderChannelRows());
  $("seg-zoo-channels").addEventListener("change", () => renderChannelRows());
  $("seg-channels").addEventListener("change", schedulePlan);
  for (const id of ["seg-cell-line", "seg-alias"]) $(id).addEventListener("change", schedulePlan);
  for (const box of document.querySelectorAll("#segment-form input[name=objects]")) box.addEventListener("change", schedulePlan);
  $("segment-form").addEventListener("submit", (event) => onSegmentSubmit(event, onSubmitted));
  $("seg-thresholds-help").textContent = EXPLAIN.thresholds;
  renderChannelRows();
}
