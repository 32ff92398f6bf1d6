// A plate's well map: 96 (8 × 12) or 384 (16 × 24) wells coloured by the object count or the
// median of any measurement; wells whose fields failed are crossed out, empty wells are grey.
import {el, fmt, svg} from "./dom.js";
import {api} from "./api.js";
import {inkOn, viridis} from "./charts.js";

function parseWell(name) {
  const m = /^([A-Z]{1,2})(\d{1,3})$/.exec(name || "");
  if (!m) return null;
  const row = m[1].length === 1 ? m[1].charCodeAt(0) - 65 : 26 + m[1].charCodeAt(1) - 65;
  return {row, col: Number(m[2]) - 1};
}

export async function showPlate(box, job, onField) {
  const plate = await api(`/api/v1/jobs/${job.id}/plate`);
  const wells = plate.wells.filter((w) => parseWell(w.well));
  if (!wells.length) {
    box.replaceChildren(el("p", {class: "muted"}, "The fields have no well names, so there is no plate map."));
    return;
  }
  const big = wells.some((w) => { const p = parseWell(w.well); return p.row >= 8 || p.col >= 12; });
  const [nRows, nCols] = big ? [16, 24] : [8, 12];
  const objects = [...new Set(wells.flatMap((w) => Object.keys(w.counts)))];
  const choices = [...objects.map((o) => [`count:${o}`, `${o} count`]),
    ...plate.measures.map((m) => [`median:${m}`, `median ${m.replace(":", " ").replaceAll("_", " ")}`])];
  const select = el("select", {class: "plate-measure", "aria-label": "colour the wells by"},
    choices.map(([value, label]) => el("option", {value}, label)));
  const map = el("div", {class: "plate-map"});
  const legend = el("div", {class: "plate-legend"});

  function valueOf(w, choice) {
    const [how, key] = [choice.slice(0, choice.indexOf(":")), choice.slice(choice.indexOf(":") + 1)];
    return how === "count" ? w.counts[key] : w.medians[key];
  }

  function draw() {
    const choice = select.value;
    const values = wells.map((w) => valueOf(w, choice)).filter((v) => Number.isFinite(v));
    const lo = values.length ? Math.min(...values) : 0;
    const hi = values.length ? Math.max(...values) : 1;
    const t = (v) => (hi > lo ? (v - lo) / (hi - lo) : 0.5);
    const cell = 28, pad = 22;
    const root = svg("svg", {viewBox: `0 0 ${pad + nCols * cell} ${pad + nRows * cell}`, class: "plate",
      role: "img", "aria-label": `${big ? 384 : 96}-well plate coloured by ${select.selectedOptions[0].textContent}`});
    for (let c = 0; c < nCols; c += 1) {
      root.append(svg("text", {x: pad + c * cell + cell / 2, y: 14, "text-anchor": "middle", class: "plate-axis"}, String(c + 1)));
    }
    for (let r = 0; r < nRows; r += 1) {
      root.append(svg("text", {x: 10, y: pad + r * cell + cell / 2 + 4, "text-anchor": "middle", class: "plate-axis"},
        String.fromCharCode(65 + r)));
      for (let c = 0; c < nCols; c += 1) {
        root.append(svg("rect", {x: pad + c * cell + 1, y: pad + r * cell + 1, width: cell - 2, height: cell - 2,
          rx: 4, class: "well empty"}));
      }
    }
    for (const w of wells) {
      const {row, col} = parseWell(w.well);
      if (row >= nRows || col >= nCols) continue;
      const v = valueOf(w, choice);
      const x = pad + col * cell + 1, y = pad + row * cell + 1;
      const failed = w.failed.length > 0;
      const g = svg("g", {class: `well-group${failed ? " failed" : ""}`, "data-well": w.well, tabindex: 0,
        role: "button", "aria-label": `well ${w.well}: ${Number.isFinite(v) ? fmt(v, 2) : "no value"}` +
          `${failed ? `, ${w.failed.length} field(s) failed` : ""}`});
      g.append(svg("rect", {x, y, width: cell - 2, height: cell - 2, rx: 4, class: "well",
        fill: Number.isFinite(v) ? viridis(t(v)) : "#d0d5dd"}));
      if (failed) {
        g.append(svg("path", {d: `M${x + 5},${y + 5}L${x + cell - 7},${y + cell - 7}M${x + cell - 7},${y + 5}L${x + 5},${y + cell - 7}`,
          class: "failed-mark"}));
      } else if (Number.isFinite(v) && choice.startsWith("count:") && v < 1000) {
        g.append(svg("text", {x: x + (cell - 2) / 2, y: y + (cell - 2) / 2 + 4, "text-anchor": "middle",
          class: "well-value", fill: inkOn(t(v))}, String(v)));
      }
      g.append(svg("title", {}, `${w.well}: ${Number.isFinite(v) ? fmt(v, 3) : "–"}` +
        (w.failed.length ? `\nfailed: ${w.failed.map((f) => `${f.field} (${f.error})`).join("; ")}` : "") +
        (w.fields.length ? `\nfields: ${w.fields.join(", ")}` : "")));
      const open = () => { if (w.fields.length) onField(w.fields[0]); };
      g.addEventListener("click", open);
      g.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); open(); } });
      root.append(g);
    }
    map.replaceChildren(root);
    const gradient = el("span", {class: "gradient", "aria-hidden": "true"});
    legend.replaceChildren(el("span", {}, fmt(lo, 2)), gradient, el("span", {}, fmt(hi, 2)),
      el("span", {class: "muted"}, " · "), el("span", {class: "failed-key", "aria-hidden": "true"}, "✕"),
      el("span", {class: "muted"}, " field failed · grey: no value or not imaged"));
  }
  select.addEventListener("change", draw);
  box.replaceChildren(el("label", {class: "inline-controls"}, "Colour wells by ", select), map, legend);
  draw();
}
