// The page of src.serve: four views in, POST /api/predict, the answer drawn on an SVG map of Croatia.
"use strict";

const VIEWS = ["0", "90", "180", "270"];
const WIDTH = 600, HEIGHT = 440, PAD = 12;
const files = {};          // view -> Blob chosen, dropped or taken from an example
let truth = null;          // true coordinates of the example shown, if any
let project = null;        // [lng, lat] -> [x, y] in the SVG, set once the border is loaded
const $ = (id) => document.getElementById(id);
const svg = (tag, attrs) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
};

function showError(message) { $("error").textContent = message || ""; }

function setView(view, blob) {
  files[view] = blob;
  const slot = $("slot-" + view);
  slot.querySelectorAll("img").forEach((img) => img.remove());
  if (blob) {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(blob);
    img.alt = view + " degrees";
    slot.appendChild(img);
  }
}

async function drawBorder() {
  const geojson = await (await fetch("/api/border")).json();
  const rings = [];
  for (const feature of geojson.features) {
    const g = feature.geometry;
    const polygons = g.type === "Polygon" ? [g.coordinates] : g.coordinates;
    for (const polygon of polygons) rings.push(...polygon);
  }
  let [w, s, e, n] = [180, 90, -180, -90];
  for (const ring of rings) for (const [lng, lat] of ring) {
    w = Math.min(w, lng); e = Math.max(e, lng); s = Math.min(s, lat); n = Math.max(n, lat);
  }
  const k = Math.cos(((s + n) / 2) * Math.PI / 180);  // equirectangular, true scale at the middle latitude
  const scale = Math.min((WIDTH - 2 * PAD) / ((e - w) * k), (HEIGHT - 2 * PAD) / (n - s));
  project = ([lng, lat]) => [PAD + (lng - w) * k * scale, PAD + (n - lat) * scale];
  const d = rings.map((ring) => "M" + ring.map((p) => project(p).map((v) => v.toFixed(1)).join(",")).join("L") + "Z").join("");
  $("land").appendChild(svg("path", { d, class: "land" }));
}

async function loadModels() {
  const answer = await (await fetch("/api/models")).json();
  const select = $("model");
  for (const m of answer.models) {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = `${m.name} (${m.approach}, ${m.backbone}, ${m.image_size} px)`;
    select.appendChild(option);
  }
}

function drawAnswer(answer) {
  const cells = $("cells"), points = $("points");
  cells.replaceChildren(); points.replaceChildren();
  const top = answer.top || [];
  const best = Math.max(...top.map((t) => t.probability), 1e-9);
  for (const t of top) {
    if (!project) continue;
    const opacity = (0.15 + 0.6 * t.probability / best).toFixed(3);
    let shape;
    if (t.bounds) {  // a grid square
      const [w, s, e, n] = t.bounds;
      const [x0, y0] = project([w, n]), [x1, y1] = project([e, s]);
      shape = svg("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, class: "cell", "fill-opacity": opacity });
    } else {  // cells without a square (adaptive cells): a disc at the class centroid
      const [x, y] = project([t.longitude, t.latitude]);
      shape = svg("circle", { cx: x, cy: y, r: (5 + 12 * t.probability / best).toFixed(1), class: "cell",
                              "fill-opacity": opacity });
    }
    shape.appendChild(svg("title", {})).textContent = `cell ${t.cell}: ${(100 * t.probability).toFixed(1)}%`;
    cells.appendChild(shape);
  }
  if (project && truth) {
    const [x, y] = project([truth.longitude, truth.latitude]);
    points.appendChild(svg("circle", { cx: x, cy: y, r: 6, class: "truth" }));
  }
  if (project) {
    const [x, y] = project([answer.longitude, answer.latitude]);
    points.appendChild(svg("circle", { cx: x, cy: y, r: 7, class: "predicted", id: "predicted-point" }));
  }
  const coords = $("coords");
  coords.dataset.lat = answer.latitude;
  coords.dataset.lng = answer.longitude;
  coords.textContent = `${answer.latitude.toFixed(5)}° N, ${answer.longitude.toFixed(5)}° E`;
  const lines = [`model ${answer.model} (${answer.engine}), ${answer.milliseconds} ms`];
  if (truth) lines.push(`true location ${truth.latitude.toFixed(5)}° N, ${truth.longitude.toFixed(5)}° E ` +
                        `(${haversineKm(truth, answer).toFixed(1)} km off; green dot)`);
  for (const s of answer.substituted_views) lines.push(`view ${s.view}° ${s.reason}: used the ${s.used}° photo`);
  const details = $("details");
  details.replaceChildren(...lines.map((text) => Object.assign(document.createElement("div"), { textContent: text })));
  if (top.length) {
    const table = document.createElement("table");
    table.innerHTML = "<tr><th>cell</th><th>probability</th><th>latitude</th><th>longitude</th></tr>";
    for (const t of top) {
      const row = table.insertRow();
      for (const v of [t.cell, (100 * t.probability).toFixed(1) + "%", t.latitude.toFixed(3), t.longitude.toFixed(3)])
        row.insertCell().textContent = v;
    }
    details.appendChild(table);
  }
}

function haversineKm(a, b) {
  const r = Math.PI / 180, dlat = (b.latitude - a.latitude) * r, dlng = (b.longitude - a.longitude) * r;
  const h = Math.sin(dlat / 2) ** 2 + Math.cos(a.latitude * r) * Math.cos(b.latitude * r) * Math.sin(dlng / 2) ** 2;
  return 2 * 6371.0088 * Math.asin(Math.sqrt(h));
}

async function predict() {
  showError("");
  const form = new FormData();
  for (const view of VIEWS) if (files[view]) form.append(view, files[view], view + ".jpg");
  if (![...form.keys()].length) { showError("Choose at least one photo first."); return; }
  const model = $("model").value;
  $("predict").disabled = true;
  document.body.dataset.state = "predicting";
  try {
    const response = await fetch("/api/predict" + (model ? "?model=" + encodeURIComponent(model) : ""),
                                 { method: "POST", body: form });
    const answer = await response.json();
    if (!response.ok) { showError(answer.error || response.statusText); return; }
    drawAnswer(answer);
  } catch (error) {
    showError("The server did not answer: " + error);
  } finally {
    $("predict").disabled = false;
    document.body.dataset.state = "done";
  }
}

let exampleIndex = 0;
async function tryExample() {
  showError("");
  const { examples } = await (await fetch("/api/examples")).json();
  if (!examples.length) { showError("This server has no examples."); return; }
  const example = examples[exampleIndex++ % examples.length];
  for (const view of VIEWS) setView(view, await (await fetch(example.views[view])).blob());
  truth = { latitude: example.latitude, longitude: example.longitude };
  await predict();
}

function assignDropped(fileList) {
  const list = [...fileList].filter((f) => f.type.startsWith("image/") || /\.(jpe?g|png)$/i.test(f.name));
  const free = VIEWS.filter((v) => !list.some((f) => f.name.replace(/\.[^.]*$/, "") === v));
  truth = null;
  for (const f of list) {
    const stem = f.name.replace(/\.[^.]*$/, "");
    const view = VIEWS.includes(stem) ? stem : free.shift();
    if (view) setView(view, f);
  }
}

function setUp() {
  for (const input of document.querySelectorAll(".slot input")) {
    input.addEventListener("change", () => { truth = null; setView(input.dataset.view, input.files[0] || null); });
  }
  const drop = $("drop");
  for (const target of [drop, ...document.querySelectorAll(".slot")]) {
    target.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    target.addEventListener("dragleave", () => drop.classList.remove("over"));
    target.addEventListener("drop", (e) => {
      e.preventDefault(); drop.classList.remove("over");
      const view = target.id.startsWith("slot-") ? target.id.slice(5) : null;
      if (view && e.dataTransfer.files.length === 1) { truth = null; setView(view, e.dataTransfer.files[0]); }
      else assignDropped(e.dataTransfer.files);
    });
  }
  $("predict").addEventListener("click", predict);
  $("example").addEventListener("click", tryExample);
  $("clear").addEventListener("click", () => {
    VIEWS.forEach((v) => setView(v, null)); truth = null; showError("");
    $("cells").replaceChildren(); $("points").replaceChildren();
    $("coords").textContent = "No prediction yet."; $("details").replaceChildren();
  });
  Promise.all([drawBorder(), loadModels()])
    .then(() => { document.body.dataset.ready = "yes"; })
    .catch((error) => showError("Could not load the map or the models: " + error));
}

setUp();
