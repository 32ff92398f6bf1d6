// Per-object measurements of one field (its measurements.csv): a sortable, paged table and a
// histogram of any column, nuclei and cells apart.
import {el, fmt, scroller} from "./dom.js";
import {api} from "./api.js";
import {histogramSvg} from "./charts.js";

const PAGE = 25;

/** A CSV as written by app.science.exports (comma-separated, quotes only around odd names). */
export function parseCsv(text) {
  const rows = [];
  let row = [], field = "", quoted = false;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i += 1; }
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i += 1;
      row.push(field); field = "";
      if (row.length > 1 || row[0] !== "") rows.push(row);
      row = [];
    } else field += c;
  }
  if (field !== "" || row.length) { row.push(field); rows.push(row); }
  const [header, ...body] = rows;
  return {columns: header || [], rows: body.map((r) => Object.fromEntries((header || []).map((h, i) => {
    const raw = r[i] ?? "";
    const number = raw === "" ? NaN : Number(raw);
    return [h, Number.isFinite(number) ? number : raw];
  })))};
}

export async function showMeasurements(box, result) {
  box.replaceChildren();
  if (!result) {
    box.append(el("p", {class: "muted"}, "This field has no measurements."));
    return;
  }
  const response = await api(result.url, {raw: true});
  const {columns, rows} = parseCsv(await response.text());
  const numeric = columns.filter((c) => c !== "object" && rows.some((r) => typeof r[c] === "number"));
  const kinds = [...new Set(rows.map((r) => r.object))];
  const view = {kind: kinds.includes("cell") ? "cell" : kinds[0], sortBy: "label", descending: false, page: 0,
    measure: numeric.find((c) => c.startsWith("mean_")) || "area"};

  const kindSelect = el("select", {"aria-label": "objects to list", class: "measure-kind"},
    kinds.map((k) => el("option", {value: k}, k === "cell" ? "cells" : k === "nucleus" ? "nuclei" : k)));
  kindSelect.value = view.kind;
  const measureSelect = el("select", {"aria-label": "measurement for the histogram", class: "measure-column"},
    numeric.map((c) => el("option", {value: c}, c.replaceAll("_", " "))));
  measureSelect.value = view.measure;
  const histogram = el("div", {class: "histogram-box"});
  const table = el("table", {class: "list measurements-table"});
  const pager = el("div", {class: "pager"});

  function draw() {
    const selected = rows.filter((r) => r.object === view.kind);
    histogram.replaceChildren(histogramSvg(selected.map((r) => r[view.measure]), view.measure.replaceAll("_", " ")));
    const sorted = [...selected].sort((a, b) => {
      const x = a[view.sortBy], y = b[view.sortBy];
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return view.descending ? -order : order;
    });
    const pages = Math.max(1, Math.ceil(sorted.length / PAGE));
    view.page = Math.min(view.page, pages - 1);
    const shown = sorted.slice(view.page * PAGE, (view.page + 1) * PAGE);
    const shownColumns = columns.filter((c) => c !== "object");
    table.replaceChildren(
      el("thead", {}, el("tr", {}, shownColumns.map((c) => el("th", {
        "aria-sort": c === view.sortBy ? (view.descending ? "descending" : "ascending") : "none"},
      el("button", {type: "button", class: "link sort", "data-column": c, onclick: () => {
        view.descending = view.sortBy === c ? !view.descending : false;
        view.sortBy = c;
        draw();
      }}, c.replaceAll("_", " "), c === view.sortBy ? (view.descending ? " ▼" : " ▲") : ""))))),
      el("tbody", {}, shown.map((r) => el("tr", {}, shownColumns.map((c) => el("td", {class: "num"},
        typeof r[c] === "number" ? fmt(r[c], 2) : r[c]))))));
    pager.replaceChildren(
      el("button", {type: "button", class: "secondary small", disabled: view.page === 0,
        onclick: () => { view.page -= 1; draw(); }}, "previous"),
      el("span", {class: "muted"}, ` ${selected.length ? view.page * PAGE + 1 : 0}–` +
        `${Math.min(selected.length, (view.page + 1) * PAGE)} of ${selected.length} `),
      el("button", {type: "button", class: "secondary small", disabled: view.page >= pages - 1,
        onclick: () => { view.page += 1; draw(); }}, "next"));
  }
  kindSelect.addEventListener("change", () => { view.kind = kindSelect.value; view.page = 0; draw(); });
  measureSelect.addEventListener("change", () => { view.measure = measureSelect.value; draw(); });
  box.append(el("h5", {}, `Measurements (${rows.length} objects)`),
    el("div", {class: "inline-controls"}, el("label", {}, "Objects ", kindSelect),
      el("label", {}, "Histogram of ", measureSelect)),
    histogram, scroller(table), pager);
  draw();
}
