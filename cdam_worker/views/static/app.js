// The dashboard's front end: the class page (filters, gallery pages, the audit's 2-D plot linked to the
// gallery) and the image page's view switch. Plain JavaScript, no library, nothing from the network.
"use strict";

const VIEWS = ["overlay", "heatmap", "input"];
const PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666", "#1f78b4", "#b2df8a"];

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function viewSwitch(form, current, onChange) {
  form.replaceChildren(element("span", { text: "show: " }));
  for (const view of VIEWS) {
    const input = element("input", { type: "radio", name: "view", value: view, id: "view-" + view });
    input.checked = view === current;
    input.addEventListener("change", () => onChange(view));
    form.append(input, element("label", { for: "view-" + view, text: view }));
  }
}

// -- class page ---------------------------------------------------------------------------------------

function initClassPage(data) {
  const params = new URLSearchParams(location.search);
  const state = {
    view: VIEWS.includes(params.get("view")) ? params.get("view") : "overlay",
    pred: params.get("pred") || "",
    label: params.get("label") || "",
    correct: params.get("correct") || "",
    cluster: params.get("cluster") || "",
    box: params.get("box") || "",
    page: Math.max(1, parseInt(params.get("page") || "1", 10) || 1) - 1,  // 1-based in the address, as on screen
  };
  const gallery = document.getElementById("gallery");
  const status = document.getElementById("status");
  const pager = document.getElementById("pager");
  const form = document.getElementById("filters");
  let pages = 1;
  let scatter = null;

  function select(name, title, options) {
    const box = element("select", { name: name, id: "filter-" + name });
    for (const [value, text] of options) box.append(element("option", { value: value, text: text }));
    box.value = state[name];
    box.addEventListener("change", () => { state[name] = box.value; state.page = 0; load(); });
    return element("label", {}, title + " ", box);
  }

  function buildFilters() {
    const classes = data.classes.map((name, index) => [String(index), name]);
    const views = element("span", { class: "views" });
    viewSwitch(views, state.view, (view) => { state.view = view; load(); });
    form.replaceChildren(
      views,
      select("pred", "predicted:", [["", "any"], ...classes]),
      select("label", "label:", [["", "any"], ...classes]),
      select("correct", "correct:", [["", "any"], ["yes", "yes"], ["no", "no"]]),
      select("cluster", "cluster:", [["", data.audit ? "any" : "any (no audit)"], ...data.clusters.map((k) => [String(k), "cluster " + k])]),
    );
  }

  function query() {
    const q = new URLSearchParams({ class: data.class, offset: state.page * data.limit, limit: data.limit, view: state.view });
    for (const name of ["pred", "label", "correct", "cluster", "box"]) if (state[name] !== "") q.set(name, state[name]);
    return q;
  }

  function remember() {
    const q = new URLSearchParams();
    for (const name of ["view", "pred", "label", "correct", "cluster", "box"]) if (state[name] !== "" && !(name === "view" && state.view === "overlay")) q.set(name, state[name]);
    if (state.page) q.set("page", state.page + 1);
    history.replaceState(null, "", q.toString() ? "?" + q : location.pathname);
  }

  async function load() {
    const response = await fetch("/api/gallery?" + query());
    if (!response.ok) { status.textContent = await response.text(); return; }
    show(await response.json());
  }

  function show(result) {
    pages = result.pages;
    if (state.page >= pages && pages > 0 && result.total > 0) { state.page = pages - 1; return load(); }
    render(result);
    remember();
    if (scatter) scatter.draw();
  }

  function render(result) {
    const cards = result.items.map((item) => {
      const mark = item.correct === null ? "" : item.correct ? " ✓" : " ✗";
      const caption = element("figcaption", {},
        element("span", { class: "key", text: item.key }), element("br"),
        (item.label_name === null ? "no label" : "label " + item.label_name) + " · pred " + item.pred_name + mark +
        (item.cluster === null ? "" : " · cluster " + item.cluster));
      const picture = element("img", { src: item.tile, alt: item.key, width: data.size, loading: "eager" });
      return element("figure", { class: "card" + (item.correct === false ? " wrong" : ""), "data-key": item.key },
        element("a", { href: item.href }, element("div", { class: "tile" }, picture), caption));
    });
    gallery.replaceChildren(...cards);
    gallery.dataset.total = result.total;
    gallery.dataset.page = state.page;
    const first = result.total ? result.offset + 1 : 0;
    const last = result.offset + result.items.length;
    const filters = ["pred", "label", "correct", "cluster", "box"].filter((name) => state[name] !== "").length;
    status.textContent = `${result.total} image(s)${filters ? " (filtered)" : ""}; showing ${first}–${last}; page ${state.page + 1} of ${pages}`;
    const button = (name, text, page, enabled) => {
      const node = element("button", { type: "button", "data-page": name, text: text });
      node.disabled = !enabled;
      node.addEventListener("click", () => { state.page = page; load(); });
      return node;
    };
    pager.replaceChildren(
      button("first", "« first", 0, state.page > 0),
      button("prev", "‹ previous", state.page - 1, state.page > 0),
      element("span", { text: ` page ${state.page + 1} of ${pages} ` }),
      button("next", "next ›", state.page + 1, state.page < pages - 1),
      button("last", "last »", pages - 1, state.page < pages - 1),
    );
  }

  for (const link of document.querySelectorAll("[data-cluster]")) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      state.cluster = link.dataset.cluster;
      state.page = 0;
      buildFilters();
      load();
    });
  }

  buildFilters();
  const canvas = document.getElementById("scatter");
  if (canvas) {
    scatter = new Scatter(canvas, data.class, state, () => { state.page = 0; load(); });
    scatter.fetch();
  }
  if (data.gallery) show(data.gallery); else load();  // the first page came with the page
}

// -- the audit's 2-D plot ---------------------------------------------------------------------------------

class Scatter {
  constructor(canvas, classIndex, state, onSelect) {
    this.canvas = canvas;
    this.classIndex = classIndex;
    this.state = state;
    this.onSelect = onSelect;
    this.points = null;
    this.drag = null;
    canvas.addEventListener("mousedown", (event) => { this.drag = { start: this.at(event), end: this.at(event) }; });
    canvas.addEventListener("mousemove", (event) => { if (this.drag) { this.drag.end = this.at(event); this.draw(); } });
    window.addEventListener("mouseup", () => this.finish());
  }

  async fetch() {
    const response = await fetch("/api/scatter?class=" + this.classIndex);
    this.points = await response.json();
    const legend = document.getElementById("scatter-legend");
    if (this.points.points === 0) {
      legend.textContent = this.points.note || "The audit has no image of this class.";
      return;
    }
    const clusters = [...new Set(this.points.cluster)].sort((a, b) => a - b);
    legend.replaceChildren(...clusters.map((k) => element("span", { class: "legend-item" }, element("span", { class: "swatch", text: "●" }), " cluster " + k + " ")));
    legend.querySelectorAll(".swatch").forEach((node, i) => { node.style.color = PALETTE[clusters[i] % PALETTE.length]; });
    const xs = this.points.x, ys = this.points.y;
    this.bounds = { x0: Math.min(...xs), x1: Math.max(...xs), y0: Math.min(...ys), y1: Math.max(...ys) };
    this.draw();
  }

  toCanvas(x, y) {
    const pad = 10, w = this.canvas.width - 2 * pad, h = this.canvas.height - 2 * pad, b = this.bounds;
    return [pad + ((x - b.x0) / (b.x1 - b.x0 || 1)) * w, pad + (1 - (y - b.y0) / (b.y1 - b.y0 || 1)) * h];
  }

  toData(px, py) {
    const pad = 10, w = this.canvas.width - 2 * pad, h = this.canvas.height - 2 * pad, b = this.bounds;
    return [b.x0 + ((px - pad) / w) * (b.x1 - b.x0 || 1), b.y0 + (1 - (py - pad) / h) * (b.y1 - b.y0 || 1)];
  }

  at(event) {
    const rect = this.canvas.getBoundingClientRect();
    return [(event.clientX - rect.left) * (this.canvas.width / rect.width), (event.clientY - rect.top) * (this.canvas.height / rect.height)];
  }

  box() {
    if (!this.state.box) return null;
    const [x0, y0, x1, y1] = this.state.box.split(",").map(Number);
    return { x0: Math.min(x0, x1), x1: Math.max(x0, x1), y0: Math.min(y0, y1), y1: Math.max(y0, y1) };
  }

  draw() {
    if (!this.points || !this.points.points) return;
    const context = this.canvas.getContext("2d");
    context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    const box = this.box();
    const cluster = this.state.cluster === "" ? null : Number(this.state.cluster);
    for (let i = 0; i < this.points.points; i++) {
      const x = this.points.x[i], y = this.points.y[i];
      const chosen = (!box || (x >= box.x0 && x <= box.x1 && y >= box.y0 && y <= box.y1)) && (cluster === null || this.points.cluster[i] === cluster);
      const [px, py] = this.toCanvas(x, y);
      context.globalAlpha = chosen ? 0.9 : 0.15;
      context.fillStyle = PALETTE[this.points.cluster[i] % PALETTE.length];
      context.beginPath();
      context.arc(px, py, this.points.flagged[i] ? 3.5 : 2.5, 0, 2 * Math.PI);
      context.fill();
    }
    context.globalAlpha = 1;
    const frame = this.drag ? [this.drag.start, this.drag.end] : box ? [this.toCanvas(box.x0, box.y1), this.toCanvas(box.x1, box.y0)] : null;
    if (frame) {
      context.strokeStyle = "#222";
      context.setLineDash([4, 3]);
      context.strokeRect(frame[0][0], frame[0][1], frame[1][0] - frame[0][0], frame[1][1] - frame[0][1]);
      context.setLineDash([]);
    }
  }

  finish() {
    if (!this.drag) return;
    const [start, end] = [this.drag.start, this.drag.end];
    this.drag = null;
    if (Math.abs(end[0] - start[0]) < 3 && Math.abs(end[1] - start[1]) < 3) {
      this.state.box = "";
    } else {
      const [x0, y0] = this.toData(start[0], start[1]);
      const [x1, y1] = this.toData(end[0], end[1]);
      this.state.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)].map((v) => v.toPrecision(6)).join(",");
    }
    this.draw();
    this.onSelect();
  }
}

// -- image page ------------------------------------------------------------------------------------------

function initImagePage() {
  const form = document.getElementById("view-switch");
  const maps = [...document.querySelectorAll(".card.map img")];
  viewSwitch(form, "overlay", (view) => {
    for (const picture of maps) {
      const url = new URL(picture.src, location.href);
      url.searchParams.set("view", view);
      picture.src = url.pathname + url.search;
    }
  });
}

const classData = document.getElementById("class-data");
if (classData) initClassPage(JSON.parse(classData.textContent));
if (document.getElementById("image-data")) initImagePage();
