// The page of src.serve: four views in, POST /api/predict, the answer drawn on an SVG map of Croatia.
"use strict";

const VIEWS = ["0", "90", "180", "270"];
const PX_PER_DEGREE = 140, PAD = 10;  // the map's viewBox is Croatia's extent at this scale, so it fills its panel
const KM_PER_DEGREE = 6371.0088 * Math.PI / 180;  // a degree of latitude; the map is true to scale in its middle
// cell probability colours (ColorBrewer YlOrRd), pale = unlikely, dark red = likely
const COLOURS = ["#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"];
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
  project = ([lng, lat]) => [PAD + (lng - w) * k * PX_PER_DEGREE, PAD + (n - lat) * PX_PER_DEGREE];
  const [width, height] = project([e, s]).map((v) => Math.ceil(v + PAD));
  $("map").setAttribute("viewBox", `0 0 ${width} ${height}`);
  const d = rings.map((ring) => "M" + ring.map((p) => project(p).map((v) => v.toFixed(1)).join(",")).join("L") + "Z").join("");
  $("land").appendChild(svg("path", { d, class: "land" }));
}

function describeModel(m) { return `${m.approach}, ${m.backbone}, ${m.image_size} px, ${m.engine}`; }

async function loadModels() {
  const answer = await (await fetch("/api/models")).json();
  const select = $("model");
  for (const m of answer.models) {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = m.name;  // the details go beside the list, so a long run name is not cut off
    option.title = `${m.name} (${describeModel(m)})`;
    option.dataset.info = describeModel(m);
    select.appendChild(option);
  }
  const showInfo = () => { $("model-info").textContent = select.selectedOptions[0]?.dataset.info || ""; };
  select.addEventListener("change", showInfo);
  showInfo();
}

// The colour scale runs from 0 to a round probability just above the best cell's, so the top cells spread over it.
function scaleTop(best) {
  for (let decade = 0.001; ; decade *= 10)
    for (const step of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8]) if (step * decade >= best) return step * decade;
}

function colourOf(t) {  // t in [0, 1] -> a colour of COLOURS, interpolated
  const x = Math.min(Math.max(t, 0), 1) * (COLOURS.length - 1), i = Math.min(Math.floor(x), COLOURS.length - 2);
  const [a, b] = [COLOURS[i], COLOURS[i + 1]].map((c) => [1, 3, 5].map((j) => parseInt(c.slice(j, j + 2), 16)));
  return "#" + a.map((v, j) => Math.round(v + (b[j] - v) * (x - i)).toString(16).padStart(2, "0")).join("");
}

const percent = (p) => String(+(100 * p).toFixed(p < 0.1 ? 1 : 0)) + "%";  // 0%, 2.5%, 5%, 10%, 20%

function drawScale(top) {
  const scale = $("scale");
  scale.replaceChildren();
  const steps = 44, x0 = 16, width = 188;
  for (let i = 0; i < steps; i++)
    scale.appendChild(svg("rect", { x: x0 + i * width / steps, y: 2, width: width / steps + 0.5, height: 12,
                                    fill: colourOf((i + 0.5) / steps) }));
  scale.appendChild(svg("rect", { x: x0, y: 2, width, height: 12, fill: "none", stroke: "#5a0013", "stroke-width": 0.6 }));
  for (const f of [0, 0.5, 1]) {
    scale.appendChild(svg("line", { x1: x0 + f * width, x2: x0 + f * width, y1: 14, y2: 18, stroke: "#333" }));
    scale.appendChild(svg("text", { x: x0 + f * width, y: 28 })).textContent = percent(f * top);
  }
  $("scale-box").hidden = false;
}

function drawCells(top) {
  const cells = $("cells");
  if (!top.length || !project) return;
  const scaleMax = scaleTop(top[0].probability);
  drawScale(scaleMax);
  top.forEach((t, i) => {
    const fill = colourOf(t.probability / scaleMax);
    let shape, cx, cy, size;
    if (t.bounds) {  // a grid square
      const [w, s, e, n] = t.bounds;
      const [x0, y0] = project([w, n]), [x1, y1] = project([e, s]);
      shape = svg("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, class: "cell", fill, "fill-opacity": 0.85 });
      [cx, cy, size] = [(x0 + x1) / 2, (y0 + y1) / 2, Math.min(x1 - x0, y1 - y0)];
    } else {  // cells without a square (adaptive cells): a disc at the class centroid
      [cx, cy] = project([t.longitude, t.latitude]);
      size = 2 * (9 + 9 * t.probability / top[0].probability);
      shape = svg("circle", { cx, cy, r: size / 2, class: "cell", fill, "fill-opacity": 0.85 });
    }
    shape.appendChild(svg("title", {})).textContent = `#${i + 1}, cell ${t.cell}: ${(100 * t.probability).toFixed(1)}%`;
    cells.appendChild(shape);
    const dark = t.probability / scaleMax > 0.55;  // the rank in white on dark red, in black on yellow
    cells.appendChild(svg("text", { x: cx, y: cy, class: "rank", "font-size": Math.max(9, Math.min(18, size * 0.45)),
                                    fill: dark ? "white" : "#222", stroke: dark ? "#5a0013" : "#fff8" })).textContent = i + 1;
  });
}

function drawTable(top) {
  const table = $("top-cells");
  table.replaceChildren();
  if (!top.length) { table.hidden = true; return; }
  const scaleMax = scaleTop(top[0].probability);
  table.createCaption().textContent = `The ${top.length} likeliest cells`;
  const head = table.createTHead().insertRow();
  for (const title of ["#", "probability", "lat", "lng"])
    Object.assign(head.appendChild(document.createElement("th")), { textContent: title, className: title });
  const body = table.createTBody();
  top.forEach((t, i) => {
    const row = body.insertRow();
    const rank = row.insertCell();
    rank.className = "rank";
    rank.textContent = i + 1;
    rank.style.background = colourOf(t.probability / scaleMax);  // CSSOM: allowed under a strict CSP
    rank.style.color = t.probability / scaleMax > 0.55 ? "white" : "#222";
    const cell = row.insertCell();
    cell.className = "probability";
    cell.textContent = (100 * t.probability).toFixed(1) + "%";
    const bar = cell.appendChild(document.createElement("div"));
    bar.className = "bar";
    bar.style.width = (100 * t.probability / scaleMax).toFixed(1) + "%";
    bar.style.background = colourOf(t.probability / scaleMax);
    row.insertCell().textContent = t.latitude.toFixed(3);
    row.insertCell().textContent = t.longitude.toFixed(3);
  });
  table.hidden = false;
}

function clearAnswer() {
  $("cells").replaceChildren(); $("regions").replaceChildren(); $("points").replaceChildren();
  $("top-cells").replaceChildren(); $("top-cells").hidden = true; $("scale-box").hidden = true;
  $("details").replaceChildren(); $("confidence").textContent = "";
}

const kmText = (km) => (km < 10 ? km.toFixed(1) : String(Math.round(km)));

// The discs around the prediction that hold 90% and 50% of the predicted probability, and the sentence.
function drawConfidence(answer) {
  if (answer.radius90_km == null || answer.radius50_km == null) {
    $("confidence").textContent = "no confidence region: " + (answer.note || "this model has none");
    return;
  }
  $("confidence").textContent = `90% sure it is within ${kmText(answer.radius90_km)} km, ` +
    `50% within ${kmText(answer.radius50_km)} km` + (answer.calibrated ? "" : " (uncalibrated)");
  if (!project) return;
  const [cx, cy] = project([answer.longitude, answer.latitude]);
  for (const [level, km] of [[90, answer.radius90_km], [50, answer.radius50_km]]) {
    const circle = svg("circle", { cx, cy, r: km * PX_PER_DEGREE / KM_PER_DEGREE, class: "region region" + level,
                                   id: "region-" + level });
    circle.appendChild(svg("title", {})).textContent = `${level}% region: within ${kmText(km)} km`;
    $("regions").appendChild(circle);
  }
}

function drawAnswer(answer) {
  clearAnswer();
  const top = answer.top || [];
  drawCells(top);
  drawTable(top);
  const points = $("points");
  if (project && truth) {
    const [x, y] = project([truth.longitude, truth.latitude]);
    points.appendChild(svg("circle", { cx: x, cy: y, r: 7, class: "truth" }));
  }
  if (project) {
    const [x, y] = project([answer.longitude, answer.latitude]);
    points.appendChild(svg("circle", { cx: x, cy: y, r: 8, class: "predicted", id: "predicted-point" }));
  }
  const coords = $("coords");
  coords.dataset.lat = answer.latitude;
  coords.dataset.lng = answer.longitude;
  coords.textContent = `${answer.latitude.toFixed(5)}° N, ${answer.longitude.toFixed(5)}° E`;
  drawConfidence(answer);
  const lines = [`model ${answer.model} (${answer.engine}), ${answer.milliseconds} ms`];
  if (truth) lines.push(`true location ${truth.latitude.toFixed(5)}° N, ${truth.longitude.toFixed(5)}° E ` +
                        `(${haversineKm(truth, answer).toFixed(1)} km off; green dot)`);
  if (!top.length) lines.push("a regression model: one point, no cell probabilities");
  if (answer.note) lines.push(answer.note);
  for (const s of answer.substituted_views) lines.push(`view ${s.view}° ${s.reason}: used the ${s.used}° photo`);
  $("details").replaceChildren(...lines.map((text) => Object.assign(document.createElement("div"), { textContent: text })));
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
    clearAnswer();
    $("coords").textContent = "No prediction yet.";
  });
  Promise.all([drawBorder(), loadModels()])
    .then(() => { document.body.dataset.ready = "yes"; })
    .catch((error) => showError("Could not load the map or the models: " + error));
}

setUp();
