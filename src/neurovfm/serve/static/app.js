// neurovfm serve: the page. Vanilla JS, no build step, nothing fetched from outside this server.
// URLs carry job ids, numbered series names and labels only; folder names go in request bodies.
"use strict";

const CANVAS = 448;
const $ = (sel, el = document) => el.querySelector(sel);
const WINDOW_NAMES = { brain: "brain W80/L40", subdural: "subdural W200/L80", bone: "bone W2800/L600", auto: "auto" };

function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

async function api(path, opts = {}) {
  opts.headers = Object.assign({ "X-NeuroVFM": "1" }, opts.headers || {});
  opts.credentials = "same-origin";
  const r = await fetch(path, opts);
  if (r.status === 401) {
    showLogin();
    throw new Error("login required");
  }
  return r;
}

async function apiJSON(path, opts) {
  const r = await api(path, opts);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || body.detail || r.statusText);
  return body;
}

const postJSON = (path, obj) =>
  apiJSON(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(obj) });

async function bitmap(path) {
  const r = await api(path);
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || r.statusText);
  return createImageBitmap(await r.blob());
}

const enc = encodeURIComponent;
const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "");

// -- login -----------------------------------------------------------------------------------------
function showLogin() {
  $("#login").hidden = false;
  $("#app").hidden = true;
}

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    await postJSON("/api/login", { token: $("#login-token").value });
    location.reload();
  } catch (err) {
    $("#login-msg").textContent = err.message;
  }
});

// -- submitting ------------------------------------------------------------------------------------
let dropped = [];

function pickedFiles() {
  const out = [...dropped];
  for (const input of [$("#files"), $("#folder")]) out.push(...input.files);
  return out;
}

function showPicked() {
  const n = pickedFiles().length;
  $("#picked").textContent = n ? `${n} file(s) chosen` : "";
}

$("#files").addEventListener("change", showPicked);
$("#folder").addEventListener("change", showPicked);
const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  dropped = [...e.dataTransfer.files];
  showPicked();
});

$("#upload-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const files = pickedFiles();
  const msg = $("#upload-msg");
  if (!files.length) { msg.textContent = "choose a zip or files first"; return; }
  const form = new FormData();
  for (const f of files) form.append("files", f, f.webkitRelativePath || f.name);
  const bar = $("#upload-progress");
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/jobs");
  xhr.setRequestHeader("X-NeuroVFM", "1");
  xhr.upload.onprogress = (ev) => { if (ev.lengthComputable) bar.value = ev.loaded / ev.total; };
  xhr.onload = () => {
    bar.hidden = true;
    $("#upload-btn").disabled = false;
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch (err) { /* not JSON */ }
    if (xhr.status === 202) {
      msg.textContent = "uploaded";
      dropped = [];
      $("#files").value = "";
      $("#folder").value = "";
      showPicked();
      refreshJobs();
      location.hash = "#job=" + body.id;
    } else if (xhr.status === 401) {
      showLogin();
    } else {
      msg.textContent = `refused: ${body.error || xhr.statusText}`;
      msg.className = "error";
    }
  };
  xhr.onerror = () => { bar.hidden = true; $("#upload-btn").disabled = false; msg.textContent = "upload failed"; };
  msg.textContent = "uploading...";
  msg.className = "";
  bar.value = 0;
  bar.hidden = false;
  $("#upload-btn").disabled = true;
  xhr.send(form);
});

// -- study folders under the server's root ---------------------------------------------------------
let rootPath = "";

async function listRoot(path) {
  try {
    const l = await postJSON("/api/root/list", { path });
    rootPath = l.path;
    $("#root-path").textContent = "/" + l.path;
    $("#root-files").textContent = `(${l.files} file(s) here)`;
    const ul = $("#root-list");
    ul.replaceChildren();
    if (l.path) {
      const up = l.path.split("/").slice(0, -1).join("/");
      ul.append(h("li", {}, h("button", { type: "button", onclick: () => listRoot(up) }, "..")));
    }
    for (const d of l.folders) {
      const next = l.path ? `${l.path}/${d}` : d;
      ul.append(h("li", {}, h("button", { type: "button", onclick: () => listRoot(next) }, d + "/")));
    }
  } catch (err) {
    $("#root-msg").textContent = err.message;
  }
}

$("#root-analyse").addEventListener("click", async () => {
  try {
    const job = await postJSON("/api/jobs/from-root", { path: rootPath });
    refreshJobs();
    location.hash = "#job=" + job.id;
  } catch (err) {
    $("#root-msg").textContent = err.message;
  }
});

// -- jobs ------------------------------------------------------------------------------------------
function stateText(j) {
  if (j.state === "queued") return `queued (position ${j.queue_position})`;
  if (j.state === "running") {
    return `running ${j.elapsed_s || 0} s` + (j.step ? `: ${j.step}` : "") +
      (j.progress !== undefined ? ` (${j.step ? "" : "about "}${Math.round(j.progress * 100)} %)` : "");
  }
  return j.state;
}

let jobsTimer = null;

async function refreshJobs() {
  clearTimeout(jobsTimer);
  let busy = false;
  try {
    const l = await apiJSON("/api/jobs");
    const tb = $("#jobs-table tbody");
    tb.replaceChildren();
    for (const j of l.jobs) {
      busy = busy || j.state === "queued" || j.state === "running";
      tb.append(h("tr", { dataset: { job: j.id } },
        h("td", {}, h("a", { href: "#job=" + j.id }, h("code", {}, j.id.slice(0, 8)))),
        h("td", {}, j.kind === "upload" ? `upload, ${j.files} file(s)` : "folder on the server"),
        h("td", { class: "state-" + j.state }, stateText(j)),
        h("td", {}, fmtTime(j.submitted || j.created)),
        h("td", {}, h("button", { type: "button", onclick: () => deleteJob(j.id), disabled: j.state === "running" }, "delete"))));
    }
  } catch (err) {
    /* shown elsewhere */
  }
  jobsTimer = setTimeout(refreshJobs, busy ? 1500 : 10000);
}

async function deleteJob(id) {
  try {
    await apiJSON(`/api/jobs/${id}`, { method: "DELETE" });
    if (currentJob === id) location.hash = "";
    refreshJobs();
  } catch (err) {
    alert(err.message);
  }
}

// -- one job ---------------------------------------------------------------------------------------
let currentJob = null;
let jobTimer = null;
let viewers = [];

function route() {
  const m = location.hash.match(/^#job=([0-9a-f]{32})$/);
  clearTimeout(jobTimer);
  if (!m) {
    currentJob = null;
    $("#viewer").hidden = true;
    return;
  }
  currentJob = m[1];
  $("#viewer").hidden = false;
  $("#result").hidden = true;
  $("#job-id").textContent = currentJob.slice(0, 8);
  $("#job-error").textContent = "";
  pollJob(currentJob);
}

async function pollJob(id) {
  if (id !== currentJob) return;
  let st;
  try {
    st = await apiJSON(`/api/jobs/${id}`);
  } catch (err) {
    $("#job-state").textContent = err.message;
    return;
  }
  if (id !== currentJob) return;
  const state = $("#job-state");
  state.textContent = stateText(st);
  state.className = "state-" + st.state;
  state.dataset.state = st.state;
  const bar = $("#job-progress");
  bar.hidden = !(st.state === "queued" || st.state === "running");
  if (st.progress !== undefined) bar.value = st.progress; else bar.removeAttribute("value");
  if (st.state === "done") {
    renderResult(id, st);
  } else if (st.state === "failed") {
    $("#job-error").textContent = st.error || "the analysis failed";
  } else {
    jobTimer = setTimeout(() => pollJob(id), 1000);
  }
}

function renderReport(report) {
  // an exam's draft findings report (`analyze --report`): structured findings, impression, the
  // consistency guard's additions and flags; nothing is shown without one
  if (!report) return null;
  const r = typeof report === "object" ? report.report : null;
  const flags = typeof report === "object" ? (report.guard_flags || []) : [];
  const body = (r && typeof r === "object")
    ? [h("ul", { class: "report-findings" }, r.findings.length ? r.findings.map((f) =>
        h("li", { class: f.added_by_guard ? "added" : "" }, h("b", {}, f.label), ` (${f.side}${f.size_mm ? ", " + f.size_mm + " mm" : ""})`,
          f.description ? `: ${f.description}` : "", f.added_by_guard ? h("span", { class: "badge added-badge" }, "added by guard") : null))
        : [h("li", {}, "no findings reported")]),
       h("p", { class: "impression" }, "Impression: ", r.impression || "")]
    : [String(report)];
  return h("div", { class: "report-block" },
    h("h3", {}, `Draft report (machine generated${report.triage ? "; triage " + report.triage : ""})`),
    h("div", { class: "report" }, ...body),
    flags.length ? h("ul", { class: "flags" }, flags.map((f) => h("li", {}, typeof f === "string" ? f
      : `${f.kind}: ${f.label}${f.side ? " (map side " + f.side + ")" : ""}${f.report_side ? ", report says " + f.report_side : ""}`))) : null);
}

function renderResult(id, st) {
  const res = st.result;
  $("#result").hidden = false;
  const triage = $("#triage");
  triage.replaceChildren(h("h3", {}, "Triage"));
  for (const ex of res.exams) {
    triage.append(h("div", { class: "triage", dataset: { modality: ex.modality } },
      `${ex.modality}: `, h("span", { class: "badge triage-level " + ex.triage.level }, ex.triage.level),
      ex.triage.drivers.length ? h("span", { class: "muted" }, ` driven by ${ex.triage.drivers.join(", ")}`) : null));
  }
  if (!res.exams.length) triage.append(h("p", {}, "No exam could be analysed (see the warnings)."));

  const warn = $("#warnings");
  warn.replaceChildren();
  if (res.warnings.length) {
    warn.append(h("h3", {}, "Warnings"), h("ul", {}, res.warnings.map((w) =>
      h("li", { class: "warn" }, h("code", {}, w.code), w.series ? ` [${w.series}]` : "", `: ${w.message}`))));
  }

  const rep = $("#report");
  rep.replaceChildren();
  for (const ex of res.exams) {
    const r = renderReport(ex.report);
    if (r) rep.append(r);
  }

  const fnd = $("#findings");
  fnd.replaceChildren();
  for (const ex of res.exams) {
    fnd.append(h("h3", {}, `${ex.modality} findings (every label, most probable first)`), h("div", { class: "table-scroll" }, h("table", { class: "findings-table", dataset: { modality: ex.modality } },
      h("thead", {}, h("tr", {}, ["label", "calibrated probability", "threshold", "decision", "side", "acuity", "map"].map((c) => h("th", {}, c)))),
      h("tbody", {}, ex.labels.map((r) => {
        const mapped = r.maps && r.maps.nifti && Object.keys(r.maps.nifti).length;
        return h("tr", { class: r.decision ? "positive" : "" },
          h("td", {}, r.label), h("td", {}, r.calibrated_probability.toFixed(3)),
          h("td", {}, r.threshold === null ? "-" : r.threshold.toFixed(3)),
          h("td", {}, r.decision ? "positive" : "negative"), h("td", {}, r.side), h("td", {}, r.acuity),
          h("td", {}, mapped ? h("button", { type: "button", class: "show-map", onclick: () => showMap(r) }, "show") : ""));
      })))));
  }

  const dl = $("#downloads");
  dl.replaceChildren(h("h3", {}, "Downloads"));
  const link = (name) => h("a", { href: `/api/jobs/${id}/files/${enc(name)}`, download: name }, name);
  const names = st.outputs.filter((f) => f === "result.json" || f.endsWith(".nii.gz"));
  dl.append(h("ul", { class: "downloads" }, names.map((n) => h("li", {}, link(n)))),
    h("p", { class: "muted" }, "Open *_map_LABEL.nii.gz over *_image.nii.gz in 3D Slicer or ITK-SNAP."));

  const ser = $("#series");
  ser.replaceChildren(h("h3", {}, "Images"));
  viewers = [];
  for (const ex of res.exams) {
    for (const s of ex.series) viewers.push(new SeriesViewer(id, s.name, ex.modality, ser));
  }
}

function showMap(row) {
  const name = row.maps.series || Object.keys(row.maps.nifti)[0];
  const v = viewers.find((x) => x.name === name);
  if (v) {
    v.showMap(row.label);
    v.root.scrollIntoView({ behavior: "smooth", block: "center" });
  }
}

// -- slice viewer ----------------------------------------------------------------------------------
class SeriesViewer {
  constructor(job, name, modality, parent) {
    this.job = job;
    this.name = name;
    this.modality = modality;
    this.seq = 0;
    this.index = {};
    this.overlay = false;
    this.base = `/api/jobs/${job}/series/${enc(name)}`;
    this.canvas = h("canvas", { width: CANVAS, height: CANVAS, tabindex: "0", class: "slice-canvas", "aria-label": `${name} slices` });
    this.slider = h("input", { type: "range", min: 0, max: 0, value: 0, class: "slice-slider", "aria-label": "slice" });
    this.indexLabel = h("span", { class: "slice-index" }, "");
    this.planeBox = h("span", { class: "planes" });
    this.windowSel = h("select", { class: "window-select", "aria-label": "window" });
    this.mapToggle = h("input", { type: "checkbox", class: "map-toggle", disabled: true });
    this.mapSel = h("select", { class: "map-select", "aria-label": "map", disabled: true });
    this.note = h("div", { class: "muted plane-note" }, "");
    this.root = h("div", { class: "series-viewer", dataset: { series: name } },
      h("h3", {}, name),
      h("div", { class: "controls" }, this.planeBox, h("label", {}, "window ", this.windowSel)),
      h("div", { class: "controls" }, h("label", {}, this.mapToggle, " map "), this.mapSel),
      this.canvas, this.slider,
      h("div", { class: "controls" }, "slice ", this.indexLabel), this.note);
    parent.append(this.root);
    this.canvas.addEventListener("wheel", (e) => { e.preventDefault(); this.scroll(e.deltaY > 0 ? 1 : -1); }, { passive: false });
    this.canvas.addEventListener("keydown", (e) => {
      if (e.key === "ArrowUp" || e.key === "ArrowRight") { e.preventDefault(); this.scroll(1); }
      if (e.key === "ArrowDown" || e.key === "ArrowLeft") { e.preventDefault(); this.scroll(-1); }
    });
    this.slider.addEventListener("input", () => { this.index[this.plane] = Number(this.slider.value); this.render(); });
    this.windowSel.addEventListener("change", () => { this.window = this.windowSel.value; this.render(); });
    this.mapToggle.addEventListener("change", () => {
      this.overlay = this.mapToggle.checked;
      if (this.overlay) this.goToPeak();
      this.render();
    });
    this.mapSel.addEventListener("change", () => { this.label = this.mapSel.value; if (this.overlay) this.goToPeak(); this.render(); });
    this.load();
  }

  async load() {
    try {
      this.info = await apiJSON(this.base);
    } catch (err) {
      this.note.textContent = err.message;
      return;
    }
    const planes = Object.keys(this.info.planes);
    for (const p of planes) {
      this.index[p] = Math.floor(this.info.planes[p].count / 2);
      this.planeBox.append(h("button", { type: "button", class: "plane-btn", dataset: { plane: p }, onclick: () => this.setPlane(p) }, p));
    }
    for (const w of this.info.windows) this.windowSel.append(h("option", { value: w }, WINDOW_NAMES[w] || w));
    this.window = this.info.default_window;
    const labels = Object.keys(this.info.maps);
    for (const l of labels) this.mapSel.append(h("option", { value: l }, l));
    this.label = labels[0];
    this.mapToggle.disabled = this.mapSel.disabled = !labels.length;
    if (!labels.length) this.mapSel.append(h("option", {}, "(no map on this series)"));
    if (this.info.default_plane) this.setPlane(this.info.default_plane);
  }

  showMap(label) {
    if (!this.info || !(label in this.info.maps)) return;
    this.label = label;
    this.mapSel.value = label;
    this.overlay = this.mapToggle.checked = true;
    this.goToPeak();
    this.render();
  }

  goToPeak() {
    const m = this.info.maps[this.label];
    if (m) this.index[this.plane] = m.peak[this.plane];
  }

  setPlane(p) {
    this.plane = p;
    for (const b of this.planeBox.children) b.classList.toggle("active", b.dataset.plane === p);
    this.slider.max = this.info.planes[p].count - 1;
    this.render();
  }

  scroll(step) {
    const n = this.info.planes[this.plane].count;
    const k = Math.min(n - 1, Math.max(0, this.index[this.plane] + step));
    if (k === this.index[this.plane]) return;
    this.index[this.plane] = k;
    this.render();
  }

  async render() {
    const seq = ++this.seq;
    const p = this.plane;
    const info = this.info.planes[p];
    const k = this.index[p];
    this.slider.value = k;
    this.indexLabel.textContent = `${k + 1} / ${info.count}`;
    this.canvas.dataset.index = k;
    const withMap = this.overlay && this.label;
    const key = `${p}:${k}:${this.window}:${withMap ? this.label : ""}`;
    let img, map;
    try {
      [img, map] = await Promise.all([
        bitmap(`${this.base}/slice?plane=${p}&index=${k}&window=${enc(this.window)}`),
        withMap ? bitmap(`${this.base}/map/${enc(this.label)}?plane=${p}&index=${k}`) : null,
      ]);
    } catch (err) {
      this.note.textContent = err.message;
      return;
    }
    if (seq !== this.seq) return; // a newer slice was asked for meanwhile
    const ctx = this.canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, CANVAS, CANVAS);
    const physW = info.width * info.col_mm, physH = info.height * info.row_mm;
    const s = Math.min((CANVAS - 8) / physW, (CANVAS - 8) / physH);
    const w = physW * s, hgt = physH * s, x = (CANVAS - w) / 2, y = (CANVAS - hgt) / 2;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(img, x, y, w, hgt);
    if (map) ctx.drawImage(map, x, y, w, hgt);
    // patient orientation on every view (left/right edges are the patient's R and L in axial and coronal)
    const m = info.marks;
    ctx.font = "bold 16px sans-serif";
    ctx.fillStyle = "#ffd800";
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    ctx.fillText(m.left, 6, CANVAS / 2);
    ctx.textAlign = "right";
    ctx.fillText(m.right, CANVAS - 6, CANVAS / 2);
    ctx.textAlign = "center";
    ctx.fillText(m.top, CANVAS / 2, 12);
    ctx.fillText(m.bottom, CANVAS / 2, CANVAS - 12);
    if (p === "sagittal" && info.sides) {
      ctx.textAlign = "left";
      ctx.fillText(info.sides[k], 6, 12);
      const [side, mm] = info.sides[k].split(" ");
      this.note.textContent = `sagittal (left/right runs across slices): this slice is ${mm} mm to the patient's ${side === "R" ? "right" : "left"} of the head's midline`;
    } else {
      this.note.textContent = `${m.left} on the screen's left = patient's ${m.left === "R" ? "right" : m.left === "A" ? "front" : m.left}`;
    }
    this.canvas.dataset.marks = [m.left, m.right, m.top, m.bottom].join(",");
    this.canvas.dataset.rendered = key;
  }
}

// -- start -----------------------------------------------------------------------------------------
async function start() {
  try {
    const auth = await (await fetch("/api/auth", { credentials: "same-origin" })).json();
    if (auth.required && !auth.ok) { showLogin(); return; }
  } catch (err) {
    showLogin();
    return;
  }
  $("#app").hidden = false;
  try {
    const info = await apiJSON("/api/info");
    $("#version").textContent = info.version;
    $("#retention").textContent = `${info.retention_hours} hours`;
    if (info.root) { $("#root-browser").hidden = false; listRoot(""); }
  } catch (err) { /* login shown */ }
  window.addEventListener("hashchange", route);
  refreshJobs();
  route();
}

start();
