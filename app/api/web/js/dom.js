// Small DOM and formatting helpers shared by every part of the page.

export const $ = (id) => document.getElementById(id);

/** el("td", {class: "num"}, "0.91") -> <td class="num">0.91</td>; children are text, nodes or arrays.
 *  A "style" object is applied through the CSSOM (style attributes would break a strict CSP). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "style") Object.assign(node.style, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

/** Replace a select's options; keeps the previous choice when it is still offered. */
export function setOptions(select, options, fallback = null) {
  const previous = select.value;
  select.replaceChildren(...options.flat(Infinity));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  else if (fallback !== null && [...select.options].some((o) => o.value === fallback)) select.value = fallback;
}

export function fmt(value, digits = 3) {
  if (value === null || value === undefined || value === "") return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  return String(value);
}

/** A score in [0, 1] (F1, precision, ...): always three decimals, so 0 and 1 read as scores too. */
export function fmtScore(value) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(3) : fmt(value);
}

export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

/** 75 -> "1 min 15 s"; 4000 -> "1 h 6 min". */
export function fmtDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function fillTable(tbody, rows, emptyText, columns) {
  tbody.replaceChildren();
  if (!rows.length) {
    tbody.append(el("tr", {}, el("td", {colspan: columns, class: "muted"}, emptyText)));
    return;
  }
  for (const row of rows) tbody.append(row);
}

/** A table that scrolls sideways on its own instead of widening the page on a narrow screen. */
export function scroller(table) {
  return el("div", {class: "table-scroll"}, table);
}

/** Save bytes (a Blob) under a file name through the browser's download. */
export function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = el("a", {href: url, download: name});
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** Short explanations shown beside the numbers they explain. */
export const EXPLAIN = {
  f1: "F1: the balance of precision (found objects that are real) and recall (real objects that were found); " +
    "an object counts as found when the predicted and annotated masks overlap with IoU ≥ 0.5. 1 is perfect.",
  map: "mAP .5:.95: the average precision over IoU thresholds 0.5 to 0.95 — how well the outlines fit, not only " +
    "whether the objects were found. Cellpose papers report it; 0.5 and above is good.",
  thresholds: "Flow threshold: the largest error allowed between a mask's flows and the network's (higher keeps " +
    "more, rougher masks). Cell probability threshold: pixels above it are inside a cell (lower finds fainter cells).",
};

/** A WEAK model: below this test F1 the page warns before it is used in production. */
export const WEAK_F1 = 0.5;
