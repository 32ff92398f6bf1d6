// Inline SVG charts: the training curve, histograms, and a colour scale for heat-maps.
import {svg} from "./dom.js";

/** Round tick values between lo and hi, and the decimals that print them all alike. */
export function niceTicks(lo, hi, count = 5) {
  if (hi <= lo) return Object.assign([lo], {decimals: 2});
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(10)));
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9) + (step / magnitude === 2.5 ? 1 : 0)));
  return Object.assign(ticks, {decimals});
}

/** Train and validation loss per epoch as an inline SVG line chart. The legend sits in its own band
 *  above the plot, so neither the "best" marker nor the curves can run into it. */
export function trainingCurveSvg(curve, bestEpoch = null) {
  const width = 640, height = 280, left = 56, right = 16, top = 40, bottom = 40;
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
  const legend = svg("g", {class: "legend-band"});
  let lx = left;
  series.forEach(([key, label, cls]) => {
    const pts = points.filter((c) => typeof c[key] === "number" && Number.isFinite(c[key]));
    if (!pts.length) return;
    root.append(svg("polyline", {class: `line ${cls}`, points: pts.map((c) => `${sx(c.epoch)},${sy(c[key])}`).join(" ")}));
    for (const c of pts) root.append(svg("circle", {class: `dot ${cls}`, cx: sx(c.epoch), cy: sy(c[key]), r: 3}));
    legend.append(svg("line", {x1: lx, x2: lx + 20, y1: 14, y2: 14, class: `line ${cls}`}));
    legend.append(svg("text", {x: lx + 26, y: 18, class: "legend"}, label));
    lx += 170;
  });
  if (Number.isFinite(bestEpoch) && bestEpoch >= x0 && bestEpoch <= x1) {
    root.append(svg("line", {x1: sx(bestEpoch), x2: sx(bestEpoch), y1: top, y2: height - bottom, class: "best"}));
    legend.append(svg("line", {x1: lx, x2: lx + 20, y1: 14, y2: 14, class: "best"}));
    legend.append(svg("text", {x: lx + 26, y: 18, class: "legend best-label"}, `best epoch (${bestEpoch})`));
  }
  root.append(legend);
  return root;
}

/** A histogram of numbers (bars of equal width), with its axis; -> <svg>. */
export function histogramSvg(values, label, bins = 30) {
  const width = 560, height = 200, left = 48, right = 12, top = 10, bottom = 42;
  const root = svg("svg", {viewBox: `0 0 ${width} ${height}`, class: "histogram", role: "img",
    "aria-label": `histogram of ${label} over ${values.length} objects`});
  const finite = values.filter((v) => Number.isFinite(v));
  if (!finite.length) return root;
  let lo = Math.min(...finite), hi = Math.max(...finite);
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  const counts = new Array(bins).fill(0);
  for (const v of finite) counts[Math.min(bins - 1, Math.floor(((v - lo) / (hi - lo)) * bins))] += 1;
  const top_ = Math.max(...counts);
  const sx = (x) => left + ((x - lo) / (hi - lo)) * (width - left - right);
  const sy = (y) => top + (1 - y / top_) * (height - top - bottom);
  const axes = svg("g", {class: "axes"});
  const yTicks = niceTicks(0, top_, 4).filter((t) => Number.isInteger(t));
  for (const t of yTicks) {
    axes.append(svg("line", {x1: left, x2: width - right, y1: sy(t), y2: sy(t), class: "grid"}));
    axes.append(svg("text", {x: left - 6, y: sy(t) + 4, "text-anchor": "end"}, String(t)));
  }
  const xTicks = niceTicks(lo, hi, 6);
  for (const t of xTicks) {
    axes.append(svg("text", {x: sx(t), y: height - bottom + 16, "text-anchor": "middle"}, t.toFixed(xTicks.decimals)));
  }
  axes.append(svg("text", {x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle"}, label));
  root.append(axes);
  const barWidth = (width - left - right) / bins;
  counts.forEach((n, i) => {
    if (!n) return;
    const bar = svg("rect", {x: left + i * barWidth + 0.5, y: sy(n), width: Math.max(1, barWidth - 1),
      height: height - bottom - sy(n), class: "bar"});
    bar.append(svg("title", {}, `${n} object(s) from ${(lo + (i * (hi - lo)) / bins).toPrecision(4)} to ` +
      `${(lo + ((i + 1) * (hi - lo)) / bins).toPrecision(4)}`));
    root.append(bar);
  });
  return root;
}

// Viridis at 9 stops (perceptually uniform, readable in grey and by most colour-blind readers).
const VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"];

/** A colour for t in [0, 1] on the viridis scale. */
export function viridis(t) {
  const x = Math.max(0, Math.min(1, Number.isFinite(t) ? t : 0)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const a = VIRIDIS[i].match(/\w\w/g).map((h) => parseInt(h, 16));
  const b = VIRIDIS[i + 1].match(/\w\w/g).map((h) => parseInt(h, 16));
  return `rgb(${a.map((v, k) => Math.round(v + (b[k] - v) * f)).join(",")})`;
}

/** Black or white text, whichever reads better on a viridis colour. */
export function inkOn(t) {
  return t > 0.55 ? "#000" : "#fff";
}
