// The result viewer: one field at full resolution with deep zoom and pan (OpenSeadragon, vendored),
// each channel a tinted layer added up like Fiji's composite, nucleus and cell outlines on top, and
// a click on a cell shows its measurements. Every layer is a PNG fetched with the key.
import {el, fmt, scroller} from "./dom.js";
import {api, showError} from "./api.js";

const viewers = new WeakMap();   // container -> {osd, urls}

async function layerUrl(path) {
  const response = await api(path, {raw: true});
  return URL.createObjectURL(await response.blob());
}

function addLayer(osd, url, {opacity = 1, composite = null, index = null} = {}) {
  return new Promise((resolve, reject) => {
    const options = {tileSource: {type: "image", url, buildPyramid: true}, opacity,
      success: (event) => resolve(event.item), error: (event) => reject(new Error(event.message || "layer failed"))};
    if (composite) options.compositeOperation = composite;
    if (index !== null) Object.assign(options, {index, replace: true});
    osd.addTiledImage(options);
  });
}

function legendSwatch(colour) {
  return el("span", {class: "swatch", style: {background: `#${colour}`}, "aria-hidden": "true"});
}

/** Open `field` of `job` in `box` (replacing what was there). */
export async function openViewer(box, job, field) {
  const old = viewers.get(box);
  if (old) {
    old.osd.destroy();
    for (const url of old.urls) URL.revokeObjectURL(url);
  }
  const base = `/api/v1/jobs/${job.id}/view/${encodeURIComponent(field)}`;
  box.replaceChildren(el("p", {class: "muted"}, "loading the field…"));
  const info = await api(base);
  const urls = [];
  const canvas = el("div", {class: "osd", id: "viewer", tabindex: "0",
    "aria-label": `field ${field}, ${info.width} × ${info.height} pixels: drag to pan, scroll or +/- to zoom, ` +
      "click a cell to see its measurements"});
  const controls = el("div", {class: "viewer-controls"});
  const picked = el("div", {class: "picked", "aria-live": "polite"},
    el("p", {class: "muted"}, "Click a cell in the image to see its measurements."));
  box.replaceChildren(el("div", {class: "viewer-layout"}, el("div", {class: "viewer-main"},
    el("div", {class: "viewer-toolbar"},
      el("button", {type: "button", class: "secondary small", "data-zoom": "in", "aria-label": "zoom in"}, "+"),
      el("button", {type: "button", class: "secondary small", "data-zoom": "out", "aria-label": "zoom out"}, "−"),
      el("button", {type: "button", class: "secondary small", "data-zoom": "home"}, "fit"),
      el("button", {type: "button", class: "secondary small", "data-zoom": "one"}, "1:1 pixels"),
      el("span", {class: "muted small-text"}, `${info.width} × ${info.height} px · ${info.dtype}`)),
    canvas), el("div", {class: "viewer-side"}, controls, picked)));

  // OpenSeadragon adds an inline <style> for touch screens unless a "style" element with this marker
  // exists; the strict CSP refuses inline styles (even an empty one), so the marker is an element of
  // another namespace that no browser treats as CSS, and the rule itself is in style.css.
  if (!document.querySelector("style[data-openseadragon-mobile-css]")) {
    const marker = document.createElementNS("urn:cellfuse:marker", "style");
    marker.setAttribute("data-openseadragon-mobile-css", "in style.css");
    document.head.append(marker);
  }
  const osd = window.OpenSeadragon({
    element: canvas, drawer: "canvas", showNavigationControl: false, showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT", navigatorSizeRatio: 0.18, maxZoomPixelRatio: 32, minZoomImageRatio: 0.5,
    visibilityRatio: 0.2, imageSmoothingEnabled: false, animationTime: 0.3,
    gestureSettingsMouse: {clickToZoom: false, dblClickToZoom: true},
  });
  canvas.osd = osd;  // for tests and the browser console: document.getElementById("viewer").osd
  viewers.set(box, {osd, urls});
  let touched = false;   // whether the user has zoomed or panned (then a resize keeps their view)
  for (const button of box.querySelectorAll("[data-zoom]")) {
    button.addEventListener("click", () => {
      touched = true;
      const how = button.dataset.zoom;
      if (how === "in") osd.viewport.zoomBy(1.5);
      if (how === "out") osd.viewport.zoomBy(1 / 1.5);
      if (how === "home") osd.viewport.goHome();
      if (how === "one") osd.viewport.zoomTo(osd.world.getItemAt(0).imageToViewportZoom(1));
      osd.viewport.applyConstraints();
    });
  }

  // Layers: channels (added up), then cell outlines, then nucleus outlines.
  const layers = [];
  for (const channel of info.channels) {
    const url = await layerUrl(`${base}/channel/${channel.index}.png`);
    urls.push(url);
    layers.push({kind: "channel", channel, item: await addLayer(osd, url, {composite: "lighter"})});
  }
  for (const obj of ["cells", "nuclei"]) {
    if (!info.objects[obj]) continue;
    const url = await layerUrl(`${base}/outlines/${obj}.png`);
    urls.push(url);
    layers.push({kind: "outline", obj, item: await addLayer(osd, url, {opacity: 0.9})});
  }
  canvas.dataset.layers = String(layers.length);

  // Controls: per channel on/off and contrast; per outline on/off and opacity; a legend.
  const channelRows = layers.filter((l) => l.kind === "channel").map((layer) => {
    const c = layer.channel;
    const step = (c.max - c.min) / 200 || 1;
    const low = el("input", {type: "number", step, value: Number(c.low.toPrecision(5)), "aria-label": `${c.name} low`,
      class: "contrast-low"});
    const high = el("input", {type: "number", step, value: Number(c.high.toPrecision(5)), "aria-label": `${c.name} high`,
      class: "contrast-high"});
    const show = el("input", {type: "checkbox", checked: true, "data-channel": c.index, "aria-label": `show ${c.name}`});
    show.addEventListener("change", () => layer.item.setOpacity(show.checked ? 1 : 0));
    let timer = null;
    const recontrast = () => {
      if (timer) clearTimeout(timer);
      timer = setTimeout(async () => {
        const lo = Number(low.value), hi = Number(high.value);
        if (!(hi > lo)) return;
        try {
          const url = await layerUrl(`${base}/channel/${c.index}.png?low=${lo}&high=${hi}`);
          urls.push(url);
          const index = osd.world.getIndexOfItem(layer.item);
          layer.item = await addLayer(osd, url, {composite: "lighter", index, opacity: show.checked ? 1 : 0});
        } catch (error) {
          showError(error);
        }
      }, 300);
    };
    low.addEventListener("change", recontrast);
    high.addEventListener("change", recontrast);
    const auto = el("button", {type: "button", class: "link small-text", onclick: () => {
      low.value = Number(c.low.toPrecision(5));
      high.value = Number(c.high.toPrecision(5));
      recontrast();
    }}, "auto");
    return el("tr", {}, el("td", {}, el("label", {class: "inline-tight"}, show, legendSwatch(c.tint), ` ${c.name}`)),
      el("td", {}, low), el("td", {}, high), el("td", {}, auto));
  });
  const outlineRows = layers.filter((l) => l.kind === "outline").map((layer) => {
    const meta = info.objects[layer.obj];
    const show = el("input", {type: "checkbox", checked: true, "data-outline": layer.obj, "aria-label": `show ${layer.obj} outlines`});
    const opacity = el("input", {type: "range", min: 0, max: 1, step: 0.05, value: 0.9,
      "aria-label": `${layer.obj} outline opacity`, "data-opacity": layer.obj});
    const apply = () => layer.item.setOpacity(show.checked ? Number(opacity.value) : 0);
    show.addEventListener("change", apply);
    opacity.addEventListener("input", apply);
    return el("tr", {}, el("td", {}, el("label", {class: "inline-tight"}, show, legendSwatch(meta.colour),
      ` ${layer.obj} outlines (${meta.count})`)), el("td", {colspan: 3}, opacity));
  });
  controls.append(
    scroller(el("table", {class: "layers"},
      el("thead", {}, el("tr", {}, el("th", {}, "Channel (colour)"), el("th", {}, "black at"), el("th", {}, "white at"),
        el("th", {}, ""))),
      el("tbody", {}, channelRows))),
    scroller(el("table", {class: "layers"}, el("thead", {}, el("tr", {}, el("th", {}, "Outlines"),
      el("th", {colspan: 3}, "opacity"))), el("tbody", {}, outlineRows))),
    el("p", {class: "muted small-text legend-text"}, "Channels add up in their colours (as in Fiji's composite); ",
      "outlines trace each object's edge pixels:",
      Object.entries(info.objects).map(([obj, meta]) => [" ", legendSwatch(meta.colour), ` ${obj}`]), "."));

  // Click a cell: its nucleus and cell labels, and their rows of measurements.csv.
  osd.addHandler("canvas-click", (event) => {
    if (!event.quick) return;
    const item = osd.world.getItemAt(0);
    if (!item) return;
    const point = item.viewportToImageCoordinates(osd.viewport.pointFromPixel(event.position));
    const x = Math.floor(point.x), y = Math.floor(point.y);
    if (x < 0 || y < 0 || x >= info.width || y >= info.height) return;
    pick(osd, base, x, y, picked).catch(showError);
  });
  await new Promise((resolve) => {
    const done = () => osd.world.getItemCount() && [...Array(osd.world.getItemCount()).keys()]
      .every((i) => osd.world.getItemAt(i).getFullyLoaded());
    if (done()) return resolve();
    const check = () => { if (done()) { osd.removeHandler("tile-drawn", check); resolve(); } };
    osd.addHandler("tile-drawn", check);
    setTimeout(resolve, 5000);
  });
  // The layout may have moved while the layers loaded: start on the whole field, and keep it whole
  // when the box changes size until the user zooms.
  osd.viewport.goHome(true);
  osd.addHandler("canvas-scroll", () => { touched = true; });
  osd.addHandler("canvas-drag", () => { touched = true; });
  new ResizeObserver(() => { if (!touched) osd.viewport.goHome(true); }).observe(canvas);
  canvas.dataset.ready = "true";
}

/** Frame the picked object (its bounding box) on the image, as Fiji's ROI manager would. */
function frame(osd, row) {
  osd.clearOverlays();
  if (!row) return;
  const item = osd.world.getItemAt(0);
  const [y0, x0, y1, x1] = ["bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"].map((k) => Number(row[k]));
  if (![y0, x0, y1, x1].every(Number.isFinite)) return;
  osd.addOverlay({element: el("div", {class: "pick-frame", "aria-hidden": "true"}),
    location: item.imageToViewportRectangle(x0, y0, x1 - x0, y1 - y0)});
}

async function pick(osd, base, x, y, box) {
  const found = await api(`${base}/pick?x=${x}&y=${y}`);
  frame(osd, found.rows.find((r) => r.object === "cell") || found.rows[0]);
  const title = el("h5", {}, `Pixel (x ${x}, y ${y})`);
  if (!found.nucleus_label && !found.cell_label) {
    box.replaceChildren(title, el("p", {class: "muted"}, "background: no nucleus or cell here"));
    return;
  }
  const columns = found.rows.length ? Object.keys(found.rows[0]).filter((k) => k !== "object") : [];
  box.replaceChildren(title,
    el("p", {}, `nucleus ${found.nucleus_label || "–"} · cell ${found.cell_label || "–"}`),
    found.rows.length ? scroller(el("table", {class: "list picked-table"},
      el("thead", {}, el("tr", {}, el("th", {}, "Measure"), found.rows.map((r) => el("th", {}, `${r.object} ${r.label}`)))),
      el("tbody", {}, columns.map((k) => el("tr", {}, el("td", {}, k.replaceAll("_", " ")),
        found.rows.map((r) => el("td", {class: "num"}, fmt(Number.isFinite(Number(r[k])) && r[k] !== "" ? Number(r[k]) : r[k]))))))))
      : el("p", {class: "muted"}, "no measurement row for this object"));
}
