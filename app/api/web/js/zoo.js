// The Model zoo tab: cell lines and reporters (and forms to add them), model versions with their
// metrics and training curves, side-by-side comparison, evaluation, promotion to an alias (with the
// server's reason when it refuses a worse model), aliases and chosen channel sets.
import {$, EXPLAIN, WEAK_F1, el, fillTable, fmt, fmtScore, setOptions} from "./dom.js";
import {ApiError, api, clearNotice, showError, showNotice} from "./api.js";
import {mayDo, state} from "./state.js";
import {trainingCurveSvg} from "./charts.js";
import {METHOD_NAMES, rankingTable} from "./jobs.js";
import {recipeWords, renderProfiles, showProfile} from "./preprocessing.js";

const compare = new Set();   // version ids ticked for the side-by-side comparison

function fusionSummary(fp) {
  const weights = fp.channels.map((c, i) => `${c} ${fmt(fp.weights[i], 2)}`).join(", ");
  const cv = fp.cv_f1 === null || fp.cv_f1 === undefined ? "" : `; cross-validated F1 ${fmtScore(fp.cv_f1)}` +
    (fp.cv_interval ? ` (${fmtScore(fp.cv_interval[0])}–${fmtScore(fp.cv_interval[1])})` : "");
  return `Flow Fusion fitted on ${fp.n_fields} field(s): ${fp.method}, weights ${weights}` +
    `${fp.confidence ? `, per-pixel ${fp.confidence}` : ""}, flow threshold ${fp.flow_threshold}, ` +
    `cell-probability threshold ${fp.cellprob_threshold}${cv}`;
}

function isWeak(v) {
  const f1 = (v.test_metrics || {}).f1;
  return typeof f1 === "number" && f1 < WEAK_F1;
}

export async function loadZoo() {
  const [cellLines, reporters, versions, aliases, channelSets] = await Promise.all([
    api("/api/v1/cell-lines"), api("/api/v1/reporters"), api("/api/v1/models"), api("/api/v1/aliases"),
    api("/api/v1/channel-sets")]);
  state.versions = versions;
  state.cellLines = cellLines;
  state.reporters = reporters;
  state.aliases = aliases;
  if (mayDo("scientist")) state.datasets = await api("/api/v1/datasets").catch(() => state.datasets);
  fillTable($("cell-lines-body"), cellLines.map((c) => el("tr", {}, el("td", {}, c.name), el("td", {}, c.species || "–"),
    el("td", {}, c.tissue || "–"))), "No cell lines yet: add the first one below.", 3);
  fillTable($("reporters-body"), reporters.map((r) => el("tr", {}, el("td", {}, r.name), el("td", {}, r.fluorophore || "–"),
    el("td", {}, r.protein || "–"), el("td", {}, r.localisation || "–"))), "No reporters yet: add one below.", 4);
  fillTable($("versions-body"), versions.map((v) => {
    const m = v.test_metrics || {};
    const production = v.aliases.includes("production");
    const tick = el("input", {type: "checkbox", class: "compare-tick", "aria-label": `compare version #${v.id}`,
      onclick: (event) => event.stopPropagation(), onchange: (event) => {
        if (event.target.checked) compare.add(v.id); else compare.delete(v.id);
        renderCompare();
      }});
    tick.checked = compare.has(v.id);
    return el("tr", {class: `version-row${v.id === state.selectedVersionId ? " selected" : ""}`, "data-version": v.id,
      tabindex: 0, onclick: () => selectVersion(v.id),
      onkeydown: (event) => { if (event.key === "Enter" && event.target === event.currentTarget) selectVersion(v.id); }},
    el("td", {}, tick), el("td", {}, v.id), el("td", {}, v.cell_line), el("td", {}, v.reporter), el("td", {}, v.object),
    el("td", {class: "num"}, v.version), el("td", {}, el("span", {class: `badge ${v.status}`}, v.status),
      v.pseudo_labelled ? el("span", {class: "badge pseudo", title: "trained on self-training pseudo-labels: "
        + "no human annotation"}, "pseudo-labelled") : null),
    el("td", {class: "num"}, fmtScore(m.f1)), el("td", {class: "num"}, fmtScore(m.precision)),
    el("td", {class: "num"}, fmtScore(m.recall)),
    el("td", {class: "num"}, fmt(v.diameter, 1)),
    el("td", {}, v.aliases.join(", ") || "–",
      production && isWeak(v) ? el("span", {class: "badge weak", title: `test F1 below ${WEAK_F1}`}, "weak") : null),
    el("td", {}, v.base_model || (v.parent_version_id ? `version #${v.parent_version_id}` : "–")));
  }), "No model versions yet: fine-tune one (Data and training tab).", 13);
  const weak = versions.filter((v) => v.aliases.includes("production") && isWeak(v));
  $("zoo-weak").hidden = !weak.length;
  $("zoo-weak").textContent = weak.length
    ? `Warning: ${weak.length} production model(s) score F1 below ${WEAK_F1} on their test set ` +
      `(${weak.map((v) => `#${v.id} ${v.reporter} ${v.object}`).join(", ")}); segmentations with them will miss or ` +
      "merge many objects. Annotate more images and fine-tune again." : "";
  fillTable($("aliases-body"), aliases.map((a) => el("tr", {}, el("td", {}, a.cell_line), el("td", {}, a.reporter),
    el("td", {}, a.object), el("td", {}, a.alias), el("td", {}, `v${a.version} (#${a.version_id})`),
    el("td", {class: "num"}, a.history.length))), "No aliases yet: promote a version below.", 6);
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
      cs.fusion_parameters ? el("p", {class: "muted"}, fusionSummary(cs.fusion_parameters)) : null,
      cs.ranking.length ? rankingTable(cs.ranking, cs.chosen) : null));
  }
  const withCurve = versions.filter((v) => v.training_curve && v.training_curve.length);
  if (!versions.some((v) => v.id === state.selectedVersionId) && withCurve.length) {
    state.selectedVersionId = withCurve[0].id;
    for (const row of document.querySelectorAll(".version-row")) {
      row.classList.toggle("selected", Number(row.dataset.version) === state.selectedVersionId);
    }
  }
  for (const id of compare) if (!versions.some((v) => v.id === id)) compare.delete(id);
  renderCurve();
  renderCompare();
  for (const form of document.querySelectorAll("#tab-zoo form.needs-scientist")) form.hidden = !mayDo("scientist");
  await renderProfiles().catch(showError);
  renderRecipe();
}

/** The selected version's preprocessing recipe (from its card), in words, with its training profile. */
function renderRecipe() {
  const version = state.versions.find((v) => v.id === state.selectedVersionId);
  const out = $("version-recipe");
  if (!version) return;
  const record = ((version.card || {}).data || {}).preprocessing || {};
  const profile = record.illumination_profile;
  const p = record.percentiles;
  out.replaceChildren(el("strong", {}, "Preprocessing: "), el("span", {class: "recipe"}, recipeWords(record.recipe)),
    Array.isArray(p) ? ` (the dataset's percentiles: ${fmt(p[0], 1)} – ${fmt(p[1], 1)})` : "",
    profile && profile.id ? el("span", {}, " · trained with ", el("a", {href: "#profiles-heading", class: "training-profile",
      "data-profile": profile.id, onclick: (event) => { event.preventDefault(); showProfile(profile.id); }},
    `illumination profile #${profile.id}`), ` (${profile.source || "stored"})`) : "");
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
  renderRecipe();
}

// ---------------------------------------------------------------------------------------------
// Compare, evaluate, promote

function renderCompare() {
  const panel = $("compare-panel");
  const chosen = state.versions.filter((v) => compare.has(v.id));
  panel.hidden = !chosen.length;
  if (!chosen.length) return;
  const rows = [["Cell line", (v) => v.cell_line], ["Reporter", (v) => v.reporter], ["Object", (v) => v.object],
    ["Version", (v) => `v${v.version} (#${v.id})`], ["Status", (v) => v.status],
    ["Test F1", (v) => fmtScore((v.test_metrics || {}).f1)], ["Precision", (v) => fmtScore((v.test_metrics || {}).precision)],
    ["Recall", (v) => fmtScore((v.test_metrics || {}).recall)], ["mAP .5:.95", (v) => fmtScore((v.test_metrics || {}).map_50_95)],
    ["Diameter (px)", (v) => fmt(v.diameter, 1)], ["Aliases", (v) => v.aliases.join(", ") || "–"],
    ["Started from", (v) => v.base_model || (v.parent_version_id ? `version #${v.parent_version_id}` : "–")],
    ["Epochs", (v) => (v.training_curve || []).length],
    ["Preprocessing", (v) => recipeWords((((v.card || {}).data || {}).preprocessing || {}).recipe)]];
  const best = Math.max(...chosen.map((v) => (v.test_metrics || {}).f1).filter(Number.isFinite));
  $("compare-table").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, ""), chosen.map((v) => el("th", {}, `#${v.id}`)))),
    el("tbody", {}, rows.map(([label, get]) => el("tr", {}, el("th", {scope: "row"}, label),
      chosen.map((v) => el("td", {class: label === "Test F1" && (v.test_metrics || {}).f1 === best ? "best-cell" : ""}, get(v)))))));
  // A refresh keeps what the user picked in these lists.
  setOptions($("promote-version"), chosen.map((v) => el("option", {value: v.id}, `#${v.id} ${v.reporter} ${v.object} v${v.version}`)));
  setOptions($("evaluate-dataset"), state.datasets.map((d) => el("option", {value: d.id}, `#${d.id} ${d.name}`)));
  $("compare-actions").hidden = !mayDo("scientist");
  $("promote-form").hidden = !mayDo("admin");
}

async function evaluateSelected(onJob) {
  clearNotice();
  try {
    const datasetId = Number($("evaluate-dataset").value);
    if (!datasetId) throw new ApiError("No dataset", "create a dataset with a test split first (Data and training tab)");
    const ids = [...compare];
    const jobs = [];
    for (const id of ids) {
      jobs.push(await api("/api/v1/jobs/evaluate", {method: "POST",
        json: {dataset_id: datasetId, model_version_id: id, split: "test"}}));
    }
    showNotice("Evaluation started", `${jobs.length} job(s); the versions' test scores update when they finish`, "info");
    if (jobs.length === 1) onJob(jobs[0].id);
  } catch (error) {
    showError(error);
  }
}

async function promote(event) {
  event.preventDefault();
  clearNotice();
  const version = state.versions.find((v) => v.id === Number($("promote-version").value));
  const out = $("promote-result");
  out.textContent = "";
  try {
    if (!version) throw new ApiError("No version", "tick a version in the table first");
    const alias = $("promote-alias").value.trim() || "production";
    const body = {version_id: version.id, force: $("promote-force").checked};
    const reason = $("promote-reason").value.trim();
    if (reason) body.reason = reason;
    await api(`/api/v1/aliases/${encodeURIComponent(version.cell_line)}/${encodeURIComponent(version.reporter)}/` +
      `${version.object}/${encodeURIComponent(alias)}`, {method: "PUT", json: body});
    out.className = "ok-text";
    out.textContent = `${alias} now points to #${version.id} (${version.reporter} ${version.object} v${version.version}).`;
    await loadZoo();
  } catch (error) {
    // The gate's refusal says why (the scores of both versions on the same test set): show it in place.
    out.className = "job-error";
    out.textContent = error instanceof ApiError ? `Refused: ${error.detail}` : String(error);
    if (error instanceof ApiError && error.status === 409) {
      out.append(el("span", {class: "muted"}, " Tick 'even if it scores worse' and give a reason to override."));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Cell lines and reporters

async function createFrom(event, path, fields, after) {
  event.preventDefault();
  clearNotice();
  const form = event.target;
  const body = {};
  for (const [key, id] of fields) {
    const value = $(id).value.trim();
    if (value) body[key] = value;
  }
  try {
    const made = await api(path, {method: "POST", json: body});
    showNotice("Added", `${made.name} is registered`, "info");
    form.reset();
    await loadZoo();
    if (after) await after();
  } catch (error) {
    showError(error);
  }
}

export function initZoo({onJob, afterReference}) {
  $("zoo-refresh").addEventListener("click", () => loadZoo().catch(showError));
  $("cell-line-form").addEventListener("submit", (event) => createFrom(event, "/api/v1/cell-lines",
    [["name", "cl-name"], ["species", "cl-species"], ["tissue", "cl-tissue"]], afterReference));
  $("reporter-form").addEventListener("submit", (event) => createFrom(event, "/api/v1/reporters",
    [["name", "rep-name"], ["fluorophore", "rep-fluorophore"], ["protein", "rep-protein"],
      ["localisation", "rep-localisation"]], afterReference));
  $("evaluate-selected").addEventListener("click", () => evaluateSelected(onJob));
  $("promote-form").addEventListener("submit", promote);
  $("zoo-f1-help").textContent = EXPLAIN.f1;
  $("compare-help").textContent = EXPLAIN.map;
}
