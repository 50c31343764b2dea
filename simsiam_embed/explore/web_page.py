"""The web app's one page: plain HTML and JavaScript over the JSON API, nothing fetched from elsewhere.

Every name that comes from the index (file names, labels) is inserted as text, never as HTML.
"""

from __future__ import annotations

from simsiam_embed.explore.pages import MAP_SCRIPT

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>simsiam-embed</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
header { display: flex; gap: 1em; align-items: center; padding: .6em 1.5em; background: #f4f5f7;
         border-bottom: 1px solid #ddd; flex-wrap: wrap; }
header h1 { font-size: 1.1em; margin: 0 1em 0 0; }
nav button { border: 0; background: none; padding: .4em .8em; cursor: pointer; font-size: .95em; border-radius: 4px; }
nav button.active { background: #1f5fbf; color: white; }
#status { color: #666; font-size: .85em; margin-left: auto; }
main { padding: 1em 1.5em; }
#drop { border: 2px dashed #99a; border-radius: 8px; padding: 1.4em; text-align: center; color: #555; }
#drop.over { background: #eef3ff; border-color: #1f5fbf; }
.row { display: flex; flex-wrap: wrap; gap: 10px; margin: .6em 0; }
figure { margin: 0; width: 150px; cursor: pointer; }
figure img { width: 150px; height: 150px; object-fit: contain; display: block; background: #f0f0f0; }
figcaption { font-size: 11px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.score { font-weight: bold; }
#query figure { cursor: default; } #query img { outline: 3px solid #1f5fbf; }
section { border-bottom: 1px solid #e4e4e4; padding-bottom: .4em; }
h2 { font-size: 1em; margin: 1em 0 .2em; }
.note { color: #666; font-size: .9em; }
.error { color: #b00020; }
canvas { border: 1px solid #ccc; max-width: 100%; }
</style></head>
<body>
<header><h1>simsiam-embed</h1>
<nav id="tabs">
 <button data-view="search" class="active">Search</button>
 <button data-view="duplicates">Duplicates</button>
 <button data-view="clusters">Clusters</button>
 <button data-view="outliers">Outliers</button>
 <button data-view="map">Map</button>
 <button data-view="report">Training report</button>
</nav><span id="status"></span></header>
<main>
<div id="view-search" class="view">
 <div id="drop">Drop an image here, or <label><u>choose one</u>
  <input id="file-input" type="file" accept="image/*" hidden></label>; click any result to search from it.</div>
 <p id="message" class="note"></p>
 <div id="query" class="row"></div>
 <div id="results" class="row"></div>
</div>
<div id="view-duplicates" class="view" hidden></div>
<div id="view-clusters" class="view" hidden></div>
<div id="view-outliers" class="view" hidden></div>
<div id="view-map" class="view" hidden><p class="note" id="map-note"></p>
 <canvas id="map" width="1000" height="700"></canvas>
 <div id="tip" style="position:fixed;display:none;background:#fff;border:1px solid #999;padding:4px;font-size:11px"></div></div>
<div id="view-report" class="view" hidden></div>
</main>
<script>
__MAP_SCRIPT__
const $ = id => document.getElementById(id);
const baseName = path => path.split(/[\\\\/]/).pop();

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

function figure(id, caption, title, onClick) {
  const node = el("figure", {"data-id": id, title: title},
                  el("img", {src: `/api/thumbnails/${id}`, alt: caption, loading: "lazy"}), el("figcaption"));
  node.querySelector("figcaption").textContent = caption;
  if (onClick) node.addEventListener("click", onClick);
  return node;
}

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail ? JSON.stringify(body.detail) : response.statusText);
  return body;
}

function say(text, isError = false) { $("message").textContent = text; $("message").className = isError ? "error" : "note"; }

function showHits(answer, queryNode) {
  $("query").replaceChildren(queryNode);
  $("results").replaceChildren(...answer.hits.map(hit =>
    figure(hit.id, `${hit.rank}. ${hit.score.toFixed(3)} ${baseName(hit.path)}`, hit.path, () => searchById(hit.id))));
  say(`${answer.hits.length} nearest images; click one to search from it.`);
}

async function searchUpload(file) {
  say("searching ...");
  const form = new FormData(); form.append("file", file);
  try {
    const answer = await api("/api/search?k=20", {method: "POST", body: form});
    const preview = el("figure", {}, el("img", {src: URL.createObjectURL(file), alt: "query"}), el("figcaption"));
    preview.querySelector("figcaption").textContent = "query: " + file.name;
    showHits(answer, preview);
  } catch (error) { say(error.message, true); }
}

async function searchById(id) {
  showView("search");
  try {
    const answer = await api(`/api/search/${id}?k=20`);
    showHits(answer, figure(id, "query: " + baseName(answer.query.path), answer.query.path));
  } catch (error) { say(error.message, true); }
}

const loaders = {
  async duplicates(view) {
    const data = await api("/api/duplicates");
    view.replaceChildren(el("p", {class: "note"}));
    view.firstChild.textContent = `${data.total_groups} groups, ${data.duplicate_files} files beyond the first of ` +
      `each, among ${data.images} images (copies: ${data.rule_text}; ${data.method}). Click an image to search from it.`;
    for (const group of data.groups) {
      const title = el("h2"); title.textContent = `group ${group.number}: ${group.members.length} images, ` +
        (group.exact ? "identical bytes" : `cosine >= ${group.min_score.toFixed(3)}`);
      view.append(el("section", {}, title, el("div", {class: "row"}, ...group.members.map(m =>
        figure(m.id, `${m.score.toFixed(3)} ${baseName(m.path)}`, m.path, () => searchById(m.id))))));
    }
  },
  async clusters(view) {
    const data = await api("/api/clusters");
    view.replaceChildren(el("p", {class: "note"}));
    view.firstChild.textContent = `${data.clusters.length} clusters of ${data.images} images (k = ${data.k}: ${data.k_reason}).`;
    for (const cluster of data.clusters) {
      const labels = Object.entries(cluster.labels).slice(0, 4).map(([l, n]) => `${l} ${n}`).join(", ");
      const title = el("h2"); title.textContent = `cluster ${cluster.number}: ${cluster.size} images, cohesion ` +
        `${cluster.cohesion.toFixed(3)}` + (labels ? ` (${labels})` : "");
      view.append(el("section", {}, title, el("div", {class: "row"}, ...cluster.nearest.map(image =>
        figure(image.id, `${image.score.toFixed(3)} ${baseName(image.path)}`, image.path, () => searchById(image.id))))));
    }
  },
  async outliers(view) {
    const data = await api("/api/outliers");
    const note = el("p", {class: "note"});
    note.textContent = `The ${data.outliers.length} images least like their ${data.neighbours} nearest neighbours ` +
      `(mean cosine; the typical image scores ${data.median_score.toFixed(3)}).`;
    view.replaceChildren(note, el("div", {class: "row"}, ...data.outliers.map(o =>
      figure(o.id, `${o.rank}. ${o.score.toFixed(3)} ${baseName(o.path)}`, o.path, () => searchById(o.id)))));
  },
  async map(view) {
    const data = await api("/api/map");
    $("map-note").textContent = `${data.method} of ${data.points.length} images. ${data.note} Hover a point to see it; ` +
      "click to search from it.";
    const points = data.points.map(p => ({...p, name: baseName(p.path)}));
    window.mapView = {points, ...drawMap($("map"), $("tip"), points, p => `/api/thumbnails/${p.id}`)};
    $("map").onclick = () => { const shown = $("tip").style.display !== "none" && $("tip").dataset.id;
                               if (shown) searchById(Number(shown)); };
  },
  async report(view) {
    const data = await api("/api/report");
    const note = el("p", {class: "note"}); note.textContent = `run ${data.run}: ${data.summary}`;
    view.replaceChildren(note, ...data.charts.map(name => el("img", {src: `/api/report/${name}.png`, alt: name})));
  },
};

const loaded = {};
async function showView(name) {
  for (const button of document.querySelectorAll("#tabs button"))
    button.classList.toggle("active", button.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + name;
  if (loaders[name] && !loaded[name]) {
    const view = $("view-" + name);
    if (name !== "map") view.replaceChildren(el("p", {class: "note"}, "working ..."));
    try { await loaders[name](view); loaded[name] = true; }
    catch (error) { const p = el("p", {class: "error"}); p.textContent = error.message;
                    name === "map" ? $("map-note").replaceChildren(p) : view.replaceChildren(p); }
  }
}

for (const button of document.querySelectorAll("#tabs button"))
  button.addEventListener("click", () => showView(button.dataset.view));
$("file-input").addEventListener("change", event => { if (event.target.files[0]) searchUpload(event.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", event => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", event => { event.preventDefault(); drop.classList.remove("over");
  if (event.dataTransfer.files[0]) searchUpload(event.dataTransfer.files[0]); });

let generation = null;
async function refreshStatus() {
  try {
    const status = await api("/api/status");
    if (generation && status.generation !== generation) for (const key in loaded) delete loaded[key];
    generation = status.generation;
    $("status").textContent = `${status.images} images, ${status.index_type}, ${status.generation}`;
  } catch (error) { $("status").textContent = error.message; }
}
refreshStatus(); setInterval(refreshStatus, 10000);
</script></body></html>
""".replace("__MAP_SCRIPT__", MAP_SCRIPT)
