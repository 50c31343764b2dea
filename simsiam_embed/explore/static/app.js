// The web app over the JSON API (/docs). Every name from the index (file names, labels) is
// inserted as text, never as HTML. Nothing is fetched from another host.
"use strict";
const $ = id => document.getElementById(id);
// Captions name the folder too: one collection often holds image_0008.jpg in several folders.
const shortName = path => path.split(/[\\/]/).slice(-2).join("/");

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

// A preview tile; `list` is the sequence it belongs to, for the viewer's previous / next.
function figure(id, caption, title, list, onClick) {
  const node = el("figure", {"data-id": id, title: title, tabindex: "0"},
                  el("img", {src: `/api/thumbnails/${id}`, alt: caption, loading: "lazy"}), el("figcaption"));
  node.querySelector("figcaption").textContent = caption;
  node.addEventListener("click", onClick || (() => openViewer(id, list)));
  node.addEventListener("keydown", event => {
    if (event.key === "Enter") { event.preventDefault(); node.click(); }
    const step = {ArrowRight: 1, ArrowLeft: -1}[event.key];
    if (step) {   // move along the row of tiles this one is in
      const tiles = [...node.parentElement.querySelectorAll("figure")];
      const next = tiles[tiles.indexOf(node) + step];
      if (next) { event.preventDefault(); next.focus(); }
    }
    const line = {ArrowDown: 1, ArrowUp: -1}[event.key];
    if (line) {   // the tile on the line of tiles below or above, nearest across (rows wrap)
      const here = node.getBoundingClientRect();
      const others = [...node.parentElement.querySelectorAll("figure")].map(tile => [tile, tile.getBoundingClientRect()])
        .filter(([, box]) => line > 0 ? box.top >= here.bottom - 1 : box.bottom <= here.top + 1);
      if (others.length) {
        const lineTop = line > 0 ? Math.min(...others.map(([, box]) => box.top)) : Math.max(...others.map(([, box]) => box.top));
        const onLine = others.filter(([, box]) => Math.abs(box.top - lineTop) < 2);
        const centre = box => box.left + box.width / 2;
        onLine.sort((a, b) => Math.abs(centre(a[1]) - centre(here)) - Math.abs(centre(b[1]) - centre(here)));
        event.preventDefault(); onLine[0][0].focus();
      }
    }
  });
  return node;
}

// An error as the sentence the server wrote: its `detail`, or FastAPI's field errors in words.
function sentence(detail, fallback) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map(d => `${(d.loc || []).slice(1).join(" ")}: ${d.msg}`.trim()).join("; ");
  return fallback;
}

async function api(url, options) {
  let response;
  try { response = await fetch(url, options); }
  catch (error) { throw new Error("The server does not answer: is `simsiam-embed serve` still running?"); }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(sentence(body.detail, `The server answered ${response.status} ${response.statusText}.`));
  return body;
}

// -- the view's state in the URL -----------------------------------------------------------
// The fragment holds the view and its settings (#duplicates?plan=keep-first&threshold=0.9,
// #search?id=12, image=ID while one is open whole), so a reload keeps the view and a link opens it.

const startState = (() => {   // the link the page was opened with, read once
  const [view, settings] = location.hash.slice(1).split("?");
  return {view: document.querySelector(`#tabs button[data-view="${CSS.escape(view || "")}"]`) ? view : "search",
          params: new URLSearchParams(settings || "")};
})();
const fromLink = (view, name) => startState.view === view ? startState.params.get(name) || "" : "";
const stateOf = {};   // each view's settings, as its last load left them
let shownView = startState.view;

function writeUrl(extra = {}) {
  const settings = Object.entries({...stateOf[shownView], ...extra}).filter(([, value]) => value !== "" && value != null);
  const text = new URLSearchParams(settings).toString();
  history.replaceState(null, "", `#${shownView}${text ? "?" + text : ""}`);
}
function remember(view, settings) { stateOf[view] = settings; if (view === shownView) writeUrl(); }

function say(text, isError = false) { $("message").textContent = text; $("message").className = isError ? "error" : "note"; }

// -- search, a page at a time --------------------------------------------------------------

const MAX_K = 200;   // the API's own limit (serve.py)
let query = null;   // {file} or {id}: what "more results" asks again, for more
const pageSize = () => Number($("page-size").value);

async function runSearch(k) {
  if (query.file) {
    const form = new FormData(); form.append("file", query.file);
    return api(`/api/search?k=${k}`, {method: "POST", body: form});
  }
  return api(`/api/search/${query.id}?k=${k}`);
}

function showHits(answer, queryNode) {
  $("query").replaceChildren(queryNode);
  const list = answer.hits.map(hit => hit.id);
  $("results").replaceChildren(...answer.hits.map(hit =>
    figure(hit.id, `${hit.rank}. ${hit.score.toFixed(3)} ${shortName(hit.path)}`, hit.path, list)));
  $("more").hidden = answer.hits.length < query.k || query.k >= MAX_K;
  say(`${answer.hits.length} nearest images, scored by centred cosine (1: the same picture, about 0: unrelated; ` +
      "the score duplicates and clusters use); click one (or Enter) to see it whole, arrows move between them." +
      (query.file ? " (A search from an uploaded file cannot be linked; one from an indexed image can.)" : ""));
  remember("search", query.id != null ? {id: query.id, k: query.k} : {});
}

async function search(newQuery, queryNode) {
  showView("search");
  query = {...newQuery, k: pageSize(), node: queryNode};
  say("searching ...");
  try { showHits(await runSearch(query.k), queryNode()); }
  catch (error) { say(error.message, true); }
}

function searchUpload(file) {
  search({file}, () => {
    const preview = el("figure", {}, el("img", {src: URL.createObjectURL(file), alt: "query"}), el("figcaption"));
    preview.querySelector("figcaption").textContent = "query: " + file.name;
    return preview;
  });
}

function searchById(id, path) {
  search({id}, () => figure(id, "query: " + shortName(path || String(id)), path || String(id), [id]));
}

$("more").addEventListener("click", async () => {
  query.k = Math.min(MAX_K, query.k + pageSize());
  try { showHits(await runSearch(query.k), query.node()); }
  catch (error) { say(error.message, true); }
});
$("page-size").addEventListener("change", () => { if (query) search(query, query.node); });

// -- the full-size viewer ------------------------------------------------------------------

// An image's facts (/api/images/{id}/facts) as the rows of a <dl>.
function factRows(facts) {
  const rows = [["path", facts.path], ["folder", facts.folder], ["label", facts.label || "-"],
                ["size", facts.width ? `${facts.width} x ${facts.height} px` : "-"],
                ["file", `${facts.bytes.toLocaleString()} bytes, ${facts.format || "?"}`], ["modified", facts.modified || "-"],
                ["on disk", facts.present ? "as indexed" : "gone or changed since indexing"]];
  return rows.flatMap(([name, value]) => {
    const dt = el("dt"), dd = el("dd"); dt.textContent = name; dd.textContent = value; return [dt, dd]; });
}

const viewer = {list: [], index: 0};

async function openViewer(id, list) {
  writeUrl({image: id});
  viewer.list = list && list.includes(id) ? list : [id];
  viewer.index = viewer.list.indexOf(id);
  const dialog = $("viewer");
  if (!dialog.open) dialog.showModal();
  const image = $("viewer-image");
  image.onload = () => image.classList.toggle("small", image.naturalWidth < 160);
  image.src = `/api/images/${id}`;
  $("viewer-title").textContent = "";
  $("viewer-facts").replaceChildren();
  $("viewer-neighbours").replaceChildren();
  try {
    const facts = await api(`/api/images/${id}/facts`);
    $("viewer-title").textContent = facts.name;
    $("viewer-image").alt = facts.name;
    $("viewer-facts").replaceChildren(...factRows(facts));
    const near = await api(`/api/search/${id}?k=8`);
    const ids = near.hits.map(hit => hit.id);
    $("viewer-neighbours").replaceChildren(...near.hits.map(hit =>
      figure(hit.id, `${hit.score.toFixed(3)} ${shortName(hit.path)}`, hit.path, ids, () => openViewer(hit.id, ids))));
  } catch (error) {
    const p = el("p", {class: "error"}); p.textContent = error.message; $("viewer-facts").replaceChildren(p);
  }
}

$("viewer-close").addEventListener("click", () => $("viewer").close());
$("viewer").addEventListener("close", () => writeUrl());
$("viewer-search").addEventListener("click", () => {
  const id = viewer.list[viewer.index];
  $("viewer").close();
  searchById(id, $("viewer-facts").querySelector("dd")?.textContent);
});
$("viewer").addEventListener("keydown", event => {
  const step = {ArrowRight: 1, ArrowLeft: -1}[event.key];
  if (!step || event.target.closest("#viewer-neighbours")) return;
  const next = viewer.index + step;
  if (next >= 0 && next < viewer.list.length) { event.preventDefault(); openViewer(viewer.list[next], viewer.list); }
});

// -- the other views -----------------------------------------------------------------------

// A CSV field as Python's csv module writes one (plan.csv's): quoted when it holds a comma, a
// quote or a line break.
const csvField = value => { const text = String(value); return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text; };

function download(name, text, type) {
  const link = el("a", {href: URL.createObjectURL(new Blob([text], {type})), download: name});
  document.body.append(link); link.click(); link.remove();
}

// Two members of a duplicate group side by side at full size, each with its facts.
async function openCompare(ids) {
  const dialog = $("compare");
  const sides = ids.map(id => {
    const facts = el("dl");
    api(`/api/images/${id}/facts`).then(found => facts.replaceChildren(...factRows(found)))
      .catch(error => { const p = el("p", {class: "error"}); p.textContent = error.message; facts.replaceChildren(p); });
    return el("div", {class: "compare-side"}, el("img", {src: `/api/images/${id}`, alt: `image ${id}`}), facts);
  });
  $("compare-body").replaceChildren(...sides);
  if (!dialog.open) dialog.showModal();
}
$("compare-close").addEventListener("click", () => $("compare").close());

const PLAN_RULES = ["keep-original", "keep-largest", "keep-oldest", "keep-first"];

const loaders = {
  async duplicates(view) {
    const planLinked = fromLink("duplicates", "plan");
    const plan = view.querySelector("#plan-rule")?.value || (PLAN_RULES.includes(planLinked) ? planLinked : "keep-original");
    const slider0 = view.querySelector("#dedup-threshold");   // "": the calibrated rule
    const linked = Number(fromLink("duplicates", "threshold"));
    const threshold = slider0 ? slider0.dataset.chosen : (linked >= 0.5 && linked <= 1 ? String(linked) : "");
    const asked = threshold ? `&threshold=${threshold}` : "";
    const data = await api(`/api/duplicates?plan=${plan}${asked}`);
    const notes = el("span", {class: "note", id: "plan-notes"});
    const working = async () => {   // every control reloads the view; say so while it does
      notes.textContent = "working ..."; notes.className = "note";
      for (const control of view.querySelectorAll("button, select, input")) control.disabled = true;
      try { await loaders.duplicates(view); }
      catch (error) {
        notes.textContent = error.message; notes.className = "error";
        for (const control of view.querySelectorAll("button, select, input")) control.disabled = false;
      }
    };
    const decide = (number, body) => async event => {   // stored by the files' digests, then shown
      event.stopPropagation();
      try {
        await api(`/api/duplicates/${number}/decision`, {method: "POST", headers: {"Content-Type": "application/json"},
                                                          body: JSON.stringify({...body, threshold: threshold ? Number(threshold) : null})});
        await working();
      } catch (error) { notes.textContent = error.message; notes.className = "error"; }
    };
    const rule = el("select", {id: "plan-rule"}, ...PLAN_RULES.map(name =>
      el("option", name === plan ? {selected: ""} : {}, name)));
    rule.addEventListener("change", working);
    const slider = el("input", {id: "dedup-threshold", type: "range", min: "0.5", max: "1", step: "0.01",
                                value: threshold || String(data.rule.threshold)});
    slider.dataset.chosen = threshold;
    const shown = el("output", {id: "dedup-threshold-value"});
    shown.textContent = threshold ? Number(threshold).toFixed(2) : `calibrated (${data.rule.threshold})`;
    slider.addEventListener("input", () => { shown.textContent = Number(slider.value).toFixed(2); });
    slider.addEventListener("change", () => { slider.dataset.chosen = slider.value; working(); });
    const calibrated = el("button", {id: "dedup-calibrated", type: "button"}, "calibrated");
    calibrated.hidden = !threshold;
    calibrated.addEventListener("click", () => { slider.dataset.chosen = ""; working(); });
    const exportAs = format => async () => {
      try {
        const answer = await api("/api/plan", {method: "POST", headers: {"Content-Type": "application/json"},
                                               body: JSON.stringify({plan: rule.value, threshold: threshold ? Number(threshold) : null})});
        format === "json" ? download("plan.json", JSON.stringify(answer.plan, null, 1), "application/json")
                          : download("plan.csv", answer.csv, "text/csv");
        notes.textContent = answer.notes.length ? answer.notes.join(" ") :
          `plan.${format}: ${answer.plan.keep.length} files kept, ${answer.plan.remove.length} to remove (nothing is deleted here).`;
        notes.className = answer.notes.length ? "error" : "note";
      } catch (error) { notes.textContent = error.message; notes.className = "error"; }
    };
    const jsonButton = el("button", {id: "export-json"}, "export plan.json"), csvButton = el("button", {id: "export-csv"}, "export plan.csv");
    jsonButton.addEventListener("click", exportAs("json")); csvButton.addEventListener("click", exportAs("csv"));
    const summary = el("p", {class: "note"});
    summary.textContent = `${data.total_groups} groups, ${data.duplicate_files} files beyond the first of each, among ` +
      `${data.images} images (copies: ${data.rule_text}; ${data.method}). The outlined image of each group is kept ` +
      `(${data.plan_text}); "keep this" under another keeps it instead, and "not a duplicate" sets a group aside: both ` +
      "are stored with the index and hold for `dedup`, index updates and every plan. Click an image to see it whole. " +
      "The plan is exported, never carried out here.";
    view.replaceChildren(summary, el("div", {class: "toolbar"}, el("label", {}, "plan ", rule),
                                     el("label", {}, "similarity at least ", slider, " ", shown), calibrated,
                                     jsonButton, csvButton, notes));
    const section = (group, setAside) => {
      const title = el("h2"); title.textContent = `group ${group.number}: ${group.members.length} images, ` +
        (group.exact ? "identical bytes" : `cosine >= ${group.min_score.toFixed(3)}`) +
        (group.evidence.length ? ` (${group.evidence.join("; ")})` : "");
      const row = el("div", {class: "row"});
      // A tile opens the image, as everywhere in the app (click or Enter); its own buttons make it
      // the keeper or compare it. One click doing both made a double-click to view also change the keeper.
      const ids = group.members.map(m => m.id);
      for (const member of group.members) {
        const tile = figure(member.id, `${member.score.toFixed(3)} ${shortName(member.path)}`, member.path, ids);
        const action = el("span", {class: "action"});
        action.textContent = setAside ? "" : `${member.action || (member === group.members[0] ? "keep" : "remove")}` +
          (member.chosen ? " (your choice) " : " ");
        tile.className = setAside ? "" : (member === group.members[0] ? "keep" : "remove");
        tile.querySelector("figcaption").prepend(action);
        if (!setAside && member !== group.members[0]) {
          const keepButton = el("button", {class: "keep-this", type: "button"}, "keep this");
          keepButton.addEventListener("click", decide(group.number, {keep: member.id}));
          const compare = el("button", {class: "compare", type: "button"}, "compare");
          compare.addEventListener("click", event => { event.stopPropagation(); openCompare([group.members[0].id, member.id]); });
          for (const button of [keepButton, compare]) {
            button.addEventListener("keydown", event => event.stopPropagation());   // Enter: the button's, not the tile's
            tile.append(button);
          }
        }
        row.append(tile);
      }
      const judge = el("button", {class: setAside ? "is-duplicate" : "not-duplicate", type: "button"},
                       setAside ? "undo: these are duplicates" : "not a duplicate");
      judge.addEventListener("click", decide(group.number, {not_duplicate: !setAside}));
      return el("section", {"data-group": group.number}, title, el("div", {class: "toolbar"}, judge), row);
    };
    remember("duplicates", {plan, threshold});
    for (const group of data.groups) view.append(section(group, false));
    if (data.set_aside.length) {
      const heading = el("h2", {id: "set-aside"});
      heading.textContent = `${data.set_aside.length} set aside: you said these are not duplicates (never in a plan)`;
      view.append(heading, ...data.set_aside.map(group => section(group, true)));
    }
  },
  async clusters(view) {
    const asked = view.querySelector("#cluster-k")?.value || fromLink("clusters", "k");
    const k = Number(asked) >= 1 ? `k=${Math.floor(Number(asked))}` : "";
    const data = await api(`/api/clusters?${k}`);
    remember("clusters", {k: k ? data.k : ""});
    const note = el("p", {class: "note"});
    note.textContent = `${data.clusters.length} clusters of ${data.images} images (k = ${data.k}: ${data.k_reason}). ` +
      "Each shows the images nearest its centre; open one whole with its button.";
    const kInput = el("input", {id: "cluster-k", type: "number", min: "1", max: String(data.images), value: String(data.k)});
    kInput.addEventListener("change", () => loaders.clusters(view).catch(error => { note.textContent = error.message;
                                                                              note.className = "error"; }));
    view.replaceChildren(note, el("div", {class: "toolbar"}, el("label", {}, "clusters (k) ", kInput)));
    for (const cluster of data.clusters) {
      const labels = Object.entries(cluster.labels).slice(0, 4).map(([l, n]) => `${l} ${n}`).join(", ");
      const title = el("h2"); title.textContent = `cluster ${cluster.number}: ${cluster.size} images, cohesion ` +
        `${cluster.cohesion.toFixed(3)}` + (labels ? ` (${labels})` : "");
      const ids = cluster.nearest.map(image => image.id);
      const row = el("div", {class: "row"}, ...cluster.nearest.map(image =>
        figure(image.id, `${image.score.toFixed(3)} ${shortName(image.path)}`, image.path, ids)));
      const whole = el("button", {class: "whole"}, `show all ${cluster.size}`);
      whole.hidden = cluster.size <= cluster.nearest.length;
      let shown = 0;
      whole.addEventListener("click", async () => {   // the cluster whole, 100 at a time
        try {
          const page = await api(`/api/clusters/${cluster.number}?k=${data.k}&offset=${shown}&limit=100`);
          if (shown === 0) { row.replaceChildren(); ids.length = 0; }
          ids.push(...page.members.map(m => m.id));
          row.append(...page.members.map(m => figure(m.id, shortName(m.path), m.path, ids)));
          shown += page.members.length;
          whole.textContent = `more (${shown} of ${cluster.size} shown)`;
          whole.hidden = shown >= cluster.size;
        } catch (error) { whole.replaceWith(Object.assign(el("p", {class: "error"}), {textContent: error.message})); }
      });
      view.append(el("section", {"data-cluster": cluster.number}, title, row, whole));
    }
  },
  async outliers(view) {
    const data = await api("/api/outliers");
    const note = el("p", {class: "note"});
    note.textContent = `The ${data.outliers.length} images least like their ${data.neighbours} nearest neighbours ` +
      `(mean cosine; the typical image scores ${data.median_score.toFixed(3)}).`;
    const ids = data.outliers.map(o => o.id);
    view.replaceChildren(note, el("div", {class: "row"}, ...data.outliers.map(o =>
      figure(o.id, `${o.rank}. ${o.score.toFixed(3)} ${shortName(o.path)}`, o.path, ids))));
  },
  async quality(view) {
    const data = await api("/api/quality");
    const note = el("p", {class: "note"});
    note.textContent = `${data.total_flagged} of ${data.images} images fail a check` +
      (data.unreadable ? ` (${data.unreadable} could not be read as indexed)` : "") +
      (data.total_flagged > data.flagged.length ? `; the first ${data.flagged.length} are shown` : "") +
      ". Each caption is the image's measure; nothing is moved or deleted.";
    view.replaceChildren(note);
    for (const [check, words] of Object.entries(data.checks)) {
      const failing = data.flagged.filter(image => image.checks.includes(check));
      const title = el("h2"); title.textContent = `${check}: ${data.counts[check]} images (${words})`;
      const ids = failing.map(image => image.id);
      view.append(el("section", {"data-check": check}, title, el("div", {class: "row"}, ...failing.map(image =>
        figure(image.id, `${image.measures[image.checks.indexOf(check)]} ${shortName(image.path)}`, image.path, ids)))));
    }
  },
  async map(view) {
    const data = await api("/api/map");
    $("map-note").textContent = `${data.method} of ${data.points.length} images, coloured by folder. ${data.note} ` +
      "Hover a point to see it, click to open it; wheel zooms, drag pans, shift-drag selects.";
    const points = data.points.map(p => ({...p, name: shortName(p.path)}));
    const showSelection = chosen => {
      const ids = chosen.map(p => p.id);
      const note = el("p", {class: "note"});
      note.textContent = `${chosen.length} images selected` + (chosen.length > 200 ? " (the first 200 shown)" : "") +
        ". Open one to search from it.";
      // The selection as a list a user can take elsewhere: id, path and folder of each image.
      const exportList = el("button", {id: "export-selection", type: "button"}, "export the selection (CSV)");
      exportList.addEventListener("click", () => download("selection.csv",
        ["id,path,label", ...chosen.map(p => [p.id, p.path, p.label || ""].map(csvField).join(","))].join("\n") + "\n",
        "text/csv"));
      $("selection").replaceChildren(note, el("div", {class: "toolbar"}, exportList),
        el("div", {class: "row"}, ...chosen.slice(0, 200).map(p => figure(p.id, p.name, p.path, ids))));
    };
    window.mapView = drawMap($("map"), $("tip"), points, p => `/api/thumbnails/${p.id}`,
                             {legend: $("legend"), onSelect: showSelection});
    window.mapView.points = points;
    $("map-reset").onclick = () => window.mapView.reset();
    $("map").onclick = () => {
      const shown = $("tip").style.display !== "none" && $("tip").dataset.id;
      if (shown && !$("map").dataset.dragged) openViewer(Number(shown), points.map(p => p.id));
    };
  },
  async report(view) {
    const data = await api("/api/report");
    const note = el("p", {class: "note"}); note.textContent = `run ${data.run}: ${data.summary}`;
    view.replaceChildren(note, ...data.charts.map(name => el("img", {src: `/api/report/${name}.png`, alt: name})));
  },
};

const loaded = {};
async function showView(name) {
  shownView = name;
  writeUrl();
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
$("choose-file").addEventListener("click", () => $("file-input").click());
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

// A fragment typed or followed in this page (replaceState, ours, fires no hashchange): open it as a link.
window.addEventListener("hashchange", () => location.reload());
// Open what the link names: its view, the search from an indexed image, the image shown whole.
(async () => {
  const linkedId = Number(fromLink("search", "id")), image = Number(startState.params.get("image"));
  if (startState.view === "search" && Number.isInteger(linkedId) && startState.params.has("id")) {
    const k = Number(startState.params.get("k"));
    if ([10, 20, 50, 100].includes(k)) $("page-size").value = String(k);
    const facts = await api(`/api/images/${linkedId}/facts`).catch(() => null);
    searchById(linkedId, facts?.path);
  } else await showView(startState.view);
  if (startState.params.has("image") && Number.isInteger(image)) openViewer(image);
})();
