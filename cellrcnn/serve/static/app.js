// The cellrcnn web page: drop images, POST each to /segment, show the overlay (zoomable), the
// count, a histogram of object areas, the per-cell table and download buttons. No libraries:
// everything here is served by the app, so the page works without internet access.
"use strict";

const FORMATS = [
  ["csv", "Measurements (CSV)"], ["tiff", "Label image (TIFF)"], ["png", "Label image (16-bit PNG)"],
  ["geojson", "QuPath (GeoJSON)"], ["imagej", "Fiji ROIs (zip)"], ["overlay", "Overlay (PNG)"],
];
// table columns shown, by name prefix (the units depend on pixel_size: _px or _um)
const COLUMNS = ["label", "centroid_x", "centroid_y", "area", "perimeter", "equivalent_diameter",
  "circularity", "solidity", "eccentricity", "mean_intensity_c0", "score"];
const MAX_ROWS = 1000;  // a table of tens of thousands of rows freezes a browser; the CSV has them all
let queue = Promise.resolve();  // images are sent one after the other
let counter = 0;

const $ = (sel, root = document) => root.querySelector(sel);

// a model's tooltip from its card: what it is, the data it learned from and under which licence
function modelTitle(card) {
  const sources = (card.trained_on || []).map((s) => `${s.source} (${s.images} images, ${s.licence})`);
  return [card.description, sources.length ? `trained on ${sources.join(", ")}` : "", card.licence]
    .filter(Boolean).join("\n");
}

async function init() {
  const health = await (await fetch("/health")).json();
  $("#version").textContent = health.version;
  const models = await (await fetch("/models")).json();
  const select = $("#model");
  for (const m of models.models) {
    const option = new Option(m.name, m.name, m.default, m.default);
    option.title = modelTitle(m.card);
    select.add(option);
  }
  const describe = () => {
    const m = models.models.find((x) => x.name === select.value);
    const d = m && m.card.object_diameter_px;
    $("#model-info").textContent = d ? `trained on nuclei of ~${d} px diameter` : (m && m.card.description) || "";
  };
  select.addEventListener("change", describe);
  describe();
}

function settings() {
  return { model: $("#model").value, diameter: $("#diameter").value.trim(), polarity: $("#polarity").value,
           pixel_size: $("#pixel_size").value.trim() };
}

function formData(file, options, extra = {}) {
  const form = new FormData();
  form.append("file", file, file.name);
  for (const [key, value] of Object.entries({ ...options, ...extra })) if (value) form.append(key, value);
  return form;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// POST /segment; a busy server answers 503 with Retry-After: wait that long and try again
async function post(form, format, onWait) {
  const url = format ? `/segment?format=${format}` : "/segment";
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(url, { method: "POST", body: form });
    if (response.status !== 503 || attempt >= 30) return response;
    const wait = Number(response.headers.get("Retry-After")) || 2;
    if (onWait) onWait(wait);
    await sleep(wait * 1000);
  }
}

async function errorText(response) {
  try { return (await response.json()).detail; } catch { return `${response.status} ${response.statusText}`; }
}

function addFiles(files) {
  for (const file of files) {
    const card = $("#result-template").content.firstElementChild.cloneNode(true);
    card.id = `result-${counter++}`;
    $(".name", card).textContent = file.name;
    $(".status", card).textContent = "waiting…";
    $("#results").prepend(card);
    const options = settings();  // downloads use the settings the shown result was made with
    queue = queue.then(() => segment(file, card, options));
  }
}

async function segment(file, card, options) {
  const status = $(".status", card);
  status.textContent = "segmenting…";
  const started = performance.now();
  try {
    const response = await post(formData(file, options, { include_overlay: "true" }), null,
      (s) => { status.textContent = `server busy, retrying in ${s} s…`; });
    if (!response.ok) throw new Error(await errorText(response));
    const data = await response.json();
    show(card, file, options, data);
    const choice = data.model_choice ? ` (auto: ${data.model_choice})` : "";
    status.textContent = `${data.model}${choice}, ${((performance.now() - started) / 1000).toFixed(1)} s`;
    card.dataset.state = "done";
  } catch (err) {
    status.textContent = `failed: ${err.message}`;
    status.classList.add("error");
    card.dataset.state = "error";
  }
}

function show(card, file, options, data) {
  $(".body", card).hidden = false;
  $(".count", card).textContent = data.n_objects;
  const scale = data.resize_factor !== 1 ? ` · predicted at ${data.resize_factor}× size` : "";
  $(".size", card).textContent = `${data.width} × ${data.height} px${scale}`;
  const summary = data.summary || {};
  const stat = (prefix) => Object.keys(summary).find((k) => k.startsWith(prefix));
  const area = stat("median_area_"), density = stat("density_per_");
  const unit = (key) => key.replace(/^.*?_(area_|per_)/, "").replace("um2", "µm²").replace("mm2", "mm²");
  $(".stats", card).textContent = [
    area && summary[area] !== null ? `median area ${summary[area].toPrecision(3)} ${unit(area)}` : "",
    density ? `${summary[density].toPrecision(3)} per ${unit(density)}` : "",
  ].filter(Boolean).join(" · ");
  const warnings = $(".warnings", card);
  for (const text of data.warnings || []) warnings.append(Object.assign(document.createElement("li"), { textContent: text }));
  warnings.hidden = !(data.warnings || []).length;
  const img = $(".overlay", card);
  img.onload = () => zoomable($(".frame", card), img, card);
  img.src = `data:image/png;base64,${data.overlay_png_base64}`;
  const areaKey = data.cells.length ? Object.keys(data.cells[0]).find((k) => k.startsWith("area_")) : "area_px";
  histogram($(".histogram", card), data.cells.map((c) => c[areaKey]), areaKey === "area_um2" ? "area (µm²)" : "area (px)");
  table($("table", card), data.cells);
  const downloads = $(".downloads", card);
  for (const [format, label] of FORMATS) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.dataset.format = format;
    button.addEventListener("click", () => download(file, options, format, button));
    downloads.append(button);
  }
}

async function download(file, options, format, button) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = "preparing…";
  try {
    const response = await post(formData(file, options), format);
    if (!response.ok) throw new Error(await errorText(response));
    const match = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = match ? match[1] : `${file.name}.${format}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    button.textContent = label;
  } catch (err) {
    button.textContent = `${label}: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

function histogram(canvas, values, xlabel) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, left = 40, bottom = 30, top = 10, right = 10;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#1d2430";
  if (!values.length) { ctx.fillText("no objects", W / 2 - 25, H / 2); return; }
  const lo = Math.min(...values), hi = Math.max(...values);
  const nbins = Math.max(1, Math.min(30, Math.ceil(Math.sqrt(values.length))));
  const width = (hi - lo) / nbins || 1;
  const counts = new Array(nbins).fill(0);
  for (const v of values) counts[Math.min(nbins - 1, Math.floor((v - lo) / width))]++;
  const peak = Math.max(...counts);
  const bw = (W - left - right) / nbins;
  ctx.fillStyle = "#3b82f6";
  counts.forEach((c, i) => {
    const h = (c / peak) * (H - top - bottom);
    ctx.fillRect(left + i * bw + 1, H - bottom - h, bw - 2, h);
  });
  ctx.fillStyle = "#1d2430";
  ctx.strokeStyle = "#6b7380";
  ctx.beginPath(); ctx.moveTo(left, top); ctx.lineTo(left, H - bottom); ctx.lineTo(W - right, H - bottom); ctx.stroke();
  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3));
  ctx.fillText(fmt(lo), left, H - bottom + 12);
  ctx.textAlign = "right";
  ctx.fillText(fmt(hi), W - right, H - bottom + 12);
  ctx.fillText(String(peak), left - 4, top + 8);
  ctx.fillText("0", left - 4, H - bottom);
  ctx.textAlign = "center";
  ctx.fillText(xlabel, (left + W - right) / 2, H - 4);
}

function table(tableEl, cells) {
  const thead = $("thead", tableEl), tbody = $("tbody", tableEl);
  if (!cells.length) { tbody.innerHTML = "<tr><td>no objects</td></tr>"; return; }
  const keys = Object.keys(cells[0]);
  const columns = COLUMNS.map((prefix) => keys.find((k) => k === prefix || k.startsWith(`${prefix}_`)))
    .filter((k) => k !== undefined);
  const head = document.createElement("tr");
  for (const key of columns) head.append(Object.assign(document.createElement("th"), { textContent: key }));
  thead.append(head);
  const cell = (v) => (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : v === null ? "" : String(v));
  for (const row of cells.slice(0, MAX_ROWS)) {
    const tr = document.createElement("tr");
    for (const key of columns) tr.append(Object.assign(document.createElement("td"), { textContent: cell(row[key]) }));
    tbody.append(tr);
  }
  if (cells.length > MAX_ROWS) {
    const tr = document.createElement("tr");
    tr.append(Object.assign(document.createElement("td"), {
      colSpan: columns.length, textContent: `… ${cells.length - MAX_ROWS} more rows in the CSV download` }));
    tbody.append(tr);
  }
}

// wheel zooms around the pointer, dragging pans, the buttons zoom about the centre or fit
function zoomable(frame, img, card) {
  const view = { scale: 1, x: 0, y: 0 };
  const apply = () => { img.style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.scale})`; };
  const fit = () => {
    view.scale = Math.min(frame.clientWidth / img.naturalWidth, frame.clientHeight / img.naturalHeight);
    view.x = (frame.clientWidth - img.naturalWidth * view.scale) / 2;
    view.y = (frame.clientHeight - img.naturalHeight * view.scale) / 2;
    apply();
  };
  const zoom = (factor, cx, cy) => {
    const next = Math.min(32, Math.max(0.05, view.scale * factor));
    view.x = cx - ((cx - view.x) * next) / view.scale;
    view.y = cy - ((cy - view.y) * next) / view.scale;
    view.scale = next;
    apply();
  };
  frame.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = frame.getBoundingClientRect();
    zoom(e.deltaY < 0 ? 1.2 : 1 / 1.2, e.clientX - r.left, e.clientY - r.top);
  }, { passive: false });
  let drag = null;
  frame.addEventListener("pointerdown", (e) => { drag = { x: e.clientX - view.x, y: e.clientY - view.y }; frame.setPointerCapture(e.pointerId); });
  frame.addEventListener("pointermove", (e) => { if (drag) { view.x = e.clientX - drag.x; view.y = e.clientY - drag.y; apply(); } });
  frame.addEventListener("pointerup", () => { drag = null; });
  for (const button of card.querySelectorAll("[data-zoom]")) {
    button.onclick = () => {
      const f = Number(button.dataset.zoom);
      if (f === 0) fit(); else zoom(f, frame.clientWidth / 2, frame.clientHeight / 2);
    };
  }
  fit();
}

const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files); });
$("#files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
init().catch((err) => { $("#model-info").textContent = `cannot reach the server: ${err.message}`; });
