// Channel thumbnails of a chosen TIFF, drawn in the browser before anything is uploaded, so that a
// user sees which channel is which. Uncompressed and zlib-compressed strips (what tifffile, ImageJ and
// most instruments write); for other layouts the page says so and the server still reads the file.
import {el} from "./dom.js";

const TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 16: 8};
const SIZE = 96;   // thumbnail side in CSS pixels

async function view(file, offset, length) {
  return new DataView(await file.slice(offset, offset + length).arrayBuffer());
}

/** The image directories of a TIFF: per page its tags as numbers or arrays of numbers. */
async function readPages(file, limit = 8) {
  const head = await view(file, 0, 16);
  const le = head.getUint8(0) === 0x49;
  const big = head.getUint16(2, le) === 43;
  let ifd = big ? Number(head.getBigUint64(8, le)) : head.getUint32(4, le);
  const pages = [];
  const seen = new Set();
  while (ifd && ifd < file.size && !seen.has(ifd) && pages.length < limit) {
    seen.add(ifd);
    const countView = await view(file, ifd, big ? 8 : 2);
    const n = Math.min(big ? Number(countView.getBigUint64(0, le)) : countView.getUint16(0, le), 512);
    const size = big ? 20 : 12;
    const entries = await view(file, ifd + (big ? 8 : 2), n * size + (big ? 8 : 4));
    const tags = {};
    for (let i = 0; i < n; i += 1) {
      const at = i * size;
      const tag = entries.getUint16(at, le);
      const type = entries.getUint16(at + 2, le);
      const count = big ? Number(entries.getBigUint64(at + 4, le)) : entries.getUint32(at + 4, le);
      const unit = TYPE_SIZES[type];
      if (!unit || ![256, 257, 258, 259, 273, 277, 279, 284, 317, 339, 322].includes(tag)) continue;
      const bytes = unit * count;
      const inline = bytes <= (big ? 8 : 4);
      const data = inline ? new DataView(entries.buffer, entries.byteOffset + at + (big ? 12 : 8), bytes)
        : await view(file, big ? Number(entries.getBigUint64(at + 12, le)) : entries.getUint32(at + 8, le), bytes);
      const values = [];
      for (let k = 0; k < Math.min(count, 100000); k += 1) {
        values.push(unit === 1 ? data.getUint8(k) : unit === 2 ? data.getUint16(k * 2, le)
          : unit === 4 ? data.getUint32(k * 4, le) : Number(data.getBigUint64(k * 8, le)));
      }
      tags[tag] = values;
    }
    pages.push(tags);
    ifd = big ? Number(entries.getBigUint64(n * size, le)) : entries.getUint32(n * size, le);
  }
  return {pages, le};
}

/** The bytes of one strip: as stored, or inflated (zlib "deflate", TIFF compression 8). */
async function strip(file, offset, count, compression) {
  const blob = file.slice(offset, offset + count);
  if (compression === 1) return new Uint8Array(await blob.arrayBuffer());
  const stream = blob.stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** One plane as numbers, sampled on a SIZE x SIZE grid. */
async function plane(file, le, offsets, counts, width, height, bits, isFloat, compression = 1, predictor = 1) {
  const bytesPer = bits / 8;
  const rowBytes = width * bytesPer;
  const parts = [];
  for (let s = 0; s < offsets.length; s += 1) parts.push(await strip(file, offsets[s], counts[s], compression));
  const raw = new Uint8Array(parts.reduce((a, b) => a + b.length, 0));
  let at = 0;
  for (const part of parts) { raw.set(part, at); at += part.length; }
  const data = new DataView(raw.buffer);
  if (predictor === 2 && !isFloat) {
    // Horizontal differencing: each sample was stored as the difference to its left neighbour.
    for (let y = 0; y < height; y += 1) {
      for (let x = 1; x < width; x += 1) {
        const p = y * rowBytes + x * bytesPer;
        if (p + bytesPer > raw.length) break;
        if (bits === 8) data.setUint8(p, (data.getUint8(p) + data.getUint8(p - 1)) & 0xff);
        else if (bits === 16) data.setUint16(p, (data.getUint16(p, le) + data.getUint16(p - 2, le)) & 0xffff, le);
        else data.setUint32(p, (data.getUint32(p, le) + data.getUint32(p - 4, le)) >>> 0, le);
      }
    }
  }
  const step = Math.max(width, height) / SIZE;
  const w = Math.max(1, Math.round(width / step)), h = Math.max(1, Math.round(height / step));
  const out = new Float32Array(w * h);
  for (let y = 0; y < h; y += 1) {
    for (let x = 0; x < w; x += 1) {
      const p = Math.floor(y * step) * rowBytes + Math.floor(x * step) * bytesPer;
      out[y * w + x] = p + bytesPer > raw.length ? 0 : bits === 8 ? data.getUint8(p) : bits === 16 ? data.getUint16(p, le)
        : isFloat ? data.getFloat32(p, le) : data.getUint32(p, le);
    }
  }
  return {values: out, w, h};
}

function canvasOf({values, w, h}) {
  const sorted = Float32Array.from(values).sort();
  const lo = sorted[Math.floor(sorted.length * 0.01)], hi = sorted[Math.floor(sorted.length * 0.998)] || lo + 1;
  const canvas = el("canvas", {width: w, height: h, class: "thumb"});
  const context = canvas.getContext("2d");
  const image = context.createImageData(w, h);
  for (let i = 0; i < values.length; i += 1) {
    const v = Math.max(0, Math.min(255, Math.round(((values[i] - lo) / (hi - lo || 1)) * 255)));
    image.data.set([v, v, v, 255], i * 4);
  }
  context.putImageData(image, 0, 0);
  return canvas;
}

/** -> a list of canvases, one per channel, or a sentence saying why there are none. */
export async function channelThumbnails(file, nChannels) {
  const {pages, le} = await readPages(file, Math.max(1, nChannels));
  const first = pages[0];
  if (!first || !first[256] || !first[273]) return "no preview: the file's layout is not a plain TIFF";
  const compression = (first[259] || [1])[0];
  if (![1, 8, 32946].includes(compression) || typeof DecompressionStream === "undefined" && compression !== 1) {
    return "no preview for this compression (the server reads the file all the same)";
  }
  const predictor = (first[317] || [1])[0];
  const bits = (first[258] || [8])[0];
  if (![8, 16, 32].includes(bits)) return `no preview for ${bits}-bit pixels`;
  const isFloat = (first[339] || [1])[0] === 3;
  const width = first[256][0], height = first[257][0];
  const samples = (first[277] || [1])[0];
  const planar = (first[284] || [1])[0];
  const planes = [];
  if (samples > 1 && planar === 2) {
    const per = first[273].length / samples;
    for (let s = 0; s < Math.min(samples, nChannels); s += 1) {
      planes.push(await plane(file, le, first[273].slice(s * per, (s + 1) * per), first[279].slice(s * per, (s + 1) * per),
        width, height, bits, isFloat, compression, predictor));
    }
  } else if (samples === 1) {
    for (const page of pages.slice(0, nChannels)) {
      if ((page[259] || [1])[0] !== compression || page[256][0] !== width) break;
      planes.push(await plane(file, le, page[273], page[279], width, height, bits, isFloat, compression, predictor));
    }
  } else {
    return "no preview for interleaved colour samples";
  }
  return planes.map(canvasOf);
}
