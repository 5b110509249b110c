// LoRA Lens views in the ComfyUI frontend: the AnalyzeLoRA dashboard drawn inside the node.
// The node sends its report JSON in ui.lens_analysis (the same string as its report_json output);
// onExecuted receives it and the dashboard draws it with web/lib/lens_draw.js (no external libraries).
import { app } from "../../scripts/app.js";
import * as D from "./lib/lens_draw.js";
import { prepareReport, summaryLines, TABLE_COLUMNS } from "./lib/lens_report.js";

const TABS = ["Summary", "Layers", "Spectrum", "Blocks", "Distribution", "Similarity", "Map"];
const HEIGHT = 430;
const SEV = { critical: D.THEME.bad, warning: D.THEME.warn, info: D.THEME.accent };

function el(tag, style = {}, props = {}) {
  const e = document.createElement(tag);
  Object.assign(e.style, style);
  Object.assign(e, props);
  return e;
}

export class AnalysisDashboard {
  constructor() {
    this.root = el("div", { width: "100%", height: `${HEIGHT}px`, display: "flex", flexDirection: "column",
      background: D.THEME.bg, color: D.THEME.text, font: D.THEME.font, position: "relative",
      boxSizing: "border-box", overflow: "hidden", borderRadius: "4px" });
    this.root.className = "lora-lens-dashboard";
    this.tabs = el("div", { display: "flex", gap: "2px", padding: "3px", flex: "0 0 auto", flexWrap: "wrap" });
    this.tools = el("div", { display: "flex", gap: "6px", padding: "0 4px", flex: "0 0 auto", alignItems: "center" });
    this.body = el("div", { flex: "1 1 auto", position: "relative", minHeight: "0" });
    this.canvas = el("canvas", { width: "100%", height: "100%", display: "block" });
    this.table = el("div", { position: "absolute", inset: "0", overflow: "auto", display: "none" });
    this.tip = el("div", { position: "absolute", pointerEvents: "none", background: "#000c", padding: "2px 5px",
      borderRadius: "3px", display: "none", whiteSpace: "nowrap", zIndex: "2" });
    this.body.append(this.canvas, this.table, this.tip);
    this.root.append(this.tabs, this.tools, this.body);
    this.tab = "Summary";
    this.view3d = { yaw: 0.6, pitch: 0.35, zoom: 1 };
    this.sort = { key: "share", dir: "desc" };
    this.group = 0;
    this.buttons = {};
    for (const t of TABS) {
      const b = el("button", { background: D.THEME.panel, color: D.THEME.text, border: "1px solid #444",
        borderRadius: "3px", padding: "2px 7px", cursor: "pointer", font: D.THEME.font }, { textContent: t });
      b.onclick = () => { this.tab = t; this.render(); };
      this.buttons[t] = b;
      this.tabs.append(b);
    }
    this.hits = null;
    this.canvas.addEventListener("mousemove", (ev) => this.hover(ev));
    this.canvas.addEventListener("mouseleave", () => { this.tip.style.display = "none"; });
    this.canvas.addEventListener("pointerdown", (ev) => this.dragStart(ev));
    this.canvas.addEventListener("wheel", (ev) => {
      if (this.tab !== "Map") return;
      ev.preventDefault();
      ev.stopPropagation();
      this.view3d = D.orbit(this.view3d, { wheel: ev.deltaY });
      this.render();
    }, { passive: false });
    if (typeof ResizeObserver !== "undefined") {
      new ResizeObserver(() => this.view && this.render()).observe(this.body);
    }
  }

  setReport(json) {
    try {
      this.view = prepareReport(json);
      this.error = null;
      const byEnergy = D.sortRows(this.view.rows.filter((r) => r.fro), "share", "desc");
      this.selected = byEnergy.length ? byEnergy[0].name : null;
      this.order = byEnergy.map((r) => r.name);
    } catch (e) {
      this.view = null;
      this.error = e.message;
      console.warn("LoRA Lens:", e.message);
    }
    this.render();
  }

  ctx2d() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(50, this.body.clientWidth);
    const h = Math.max(50, this.body.clientHeight);
    if (this.canvas.width !== Math.round(w * dpr) || this.canvas.height !== Math.round(h * dpr)) {
      this.canvas.width = Math.round(w * dpr);
      this.canvas.height = Math.round(h * dpr);
      this.canvas.style.width = `${w}px`;
      this.canvas.style.height = `${h}px`;
    }
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = D.THEME.bg;
    ctx.fillRect(0, 0, w, h);
    return { ctx, w, h };
  }

  moduleSelect() {
    const sel = el("select", { background: D.THEME.panel, color: D.THEME.text, maxWidth: "100%", font: D.THEME.small });
    for (const name of this.order.slice(0, 400)) sel.append(el("option", {}, { value: name, textContent: name }));
    sel.value = this.selected;
    sel.onchange = () => { this.selected = sel.value; this.render(); };
    return sel;
  }

  render() {
    for (const [t, b] of Object.entries(this.buttons)) b.style.background = t === this.tab ? "#3b4252" : D.THEME.panel;
    this.tools.replaceChildren();
    this.table.style.display = "none";
    this.canvas.style.display = "block";
    this.hits = null;
    const { ctx, w, h } = this.ctx2d();
    if (!this.view) {
      ctx.fillStyle = this.error ? D.THEME.bad : D.THEME.muted;
      ctx.font = D.THEME.font;
      ctx.textAlign = "left";
      ctx.textBaseline = "top";
      ctx.fillText(this.error || "Run the workflow to analyse the LoRA.", 8, 8);
      return;
    }
    const v = this.view;
    const full = { x: 0, y: 0, w, h };
    if (this.tab === "Summary") this.drawSummary(ctx, full);
    else if (this.tab === "Layers") this.drawTable();
    else if (this.tab === "Spectrum") {
      this.tools.append(this.moduleSelect());
      const sv = v.spectra.get(this.selected) || [];
      const row = v.rows.find((r) => r.name === this.selected) || {};
      const top = { x: 0, y: 0, w, h: h * 0.6 };
      D.drawLinePlot(ctx, top, [{ values: sv, color: D.THEME.accent }], {
        logY: true, title: `singular values of ΔW (log) · k90 ${row.k90} · k99 ${row.k99} · k99.9 ${row.k999}`,
        markers: [{ x: row.k90, color: D.THEME.good }, { x: row.k99, color: D.THEME.warn }, { x: row.k999, color: D.THEME.bad }],
      });
      const e2 = sv.map((s) => s * s);
      const tot = e2.reduce((a, b) => a + b, 0) || 1;
      let acc = 0;
      const cum = e2.map((x) => (acc += x) / tot);
      D.drawLinePlot(ctx, { x: 0, y: h * 0.6 + 4, w, h: h * 0.4 - 4 }, [{ values: cum, color: D.THEME.good }],
        { title: "cumulative energy Σσᵢ² / Σσ²" });
    } else if (this.tab === "Blocks") {
      const chosen = new Set(v.smallestSet);
      const items = v.blocks.map((b) => ({ label: b.name, value: 100 * b.share, highlight: chosen.has(b.name), block: b }));
      const bars = D.drawBarChart(ctx, full, items, { title: `share of ΔW energy per block (%) · highlighted: the ${chosen.size} blocks holding ${Math.round(100 * v.targetShare)} %` });
      this.hits = { kind: "bars", bars };
    } else if (this.tab === "Distribution") {
      const hist = v.histogram;
      D.drawHistogram(ctx, { x: 0, y: 0, w, h: h * 0.55 }, hist.counts, hist.edges,
        { logY: true, title: `ΔW elements of all modules, in std units (log count) · beyond ±6σ: ${hist.under + hist.over}` });
      this.tools.append(this.moduleSelect());
      const mh = v.moduleHistogram(this.selected);
      if (mh) {
        const n = mh.counts.length;
        const edges = Array.from({ length: n + 1 }, (_, i) => mh.lo + ((mh.hi - mh.lo) * i) / n);
        D.drawHistogram(ctx, { x: 0, y: h * 0.55 + 4, w, h: h * 0.45 - 4 }, mh.counts, edges,
          { title: `ΔW elements of ${this.selected.slice(-60)}`, color: D.THEME.good });
      }
    } else if (this.tab === "Similarity") {
      if (!v.similarity.length) {
        ctx.fillStyle = D.THEME.muted;
        ctx.fillText("No two modules of equal shape with a spectrum.", 8, 8);
        return;
      }
      const sel = el("select", { background: D.THEME.panel, color: D.THEME.text, font: D.THEME.small });
      v.similarity.forEach((g, i) => sel.append(el("option", {}, { value: String(i), textContent: `${g.shape.join("×")} (${g.names.length} modules)` })));
      sel.value = String(this.group);
      sel.onchange = () => { this.group = Number(sel.value); this.render(); };
      this.tools.append(sel);
      const g = v.similarity[Math.min(this.group, v.similarity.length - 1)];
      const geom = D.drawHeatmap(ctx, full, g.matrix, { title: `cosine similarity of ΔW · ${g.method}` });
      this.hits = { kind: "cells", geom, group: g };
    } else if (this.tab === "Map") {
      const m = v.map;
      const proj = D.drawPoints3D(ctx, full, m.points, this.view3d, {
        title: `3-D map of modules (PCA of per-module features; explained ${m.explained.map((x) => Math.round(100 * x)).join("/")} %) · drag to rotate, wheel to zoom`,
        color: (i) => (m.outliers.has(m.names[i]) ? D.THEME.bad : D.viridis(Math.min(1, (m.score[i] || 0) / 4))),
        radius: (i) => (m.outliers.has(m.names[i]) ? 5 : 3),
      });
      this.hits = { kind: "points", proj };
    }
  }

  drawSummary(ctx, r) {
    const v = this.view;
    D.drawScore(ctx, { x: 6, y: 6, w: 120, h: 52 }, "efficiency", v.scores.efficiency);
    D.drawScore(ctx, { x: 132, y: 6, w: 120, h: 52 }, "health", v.scores.health);
    ctx.font = D.THEME.font;
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    let y = 66;
    for (const line of summaryLines(v)) {
      ctx.fillStyle = D.THEME.text;
      for (const l of D.wrapText(ctx, line, r.w - 16)) { ctx.fillText(l, 8, y); y += 14; }
    }
    y += 6;
    for (const f of v.findings) {
      if (y > r.h - 14) break;
      ctx.fillStyle = SEV[f.severity] || D.THEME.text;
      ctx.fillText(`● ${f.title}`, 8, y);
      y += 14;
      ctx.fillStyle = D.THEME.muted;
      for (const l of D.wrapText(ctx, f.text, r.w - 24)) {
        if (y > r.h - 14) break;
        ctx.fillText(l, 20, y);
        y += 13;
      }
    }
  }

  drawTable() {
    this.canvas.style.display = "none";
    this.table.style.display = "block";
    const rows = D.sortRows(this.view.rows, this.sort.key, this.sort.dir).slice(0, 500);
    const t = el("table", { borderCollapse: "collapse", width: "100%", font: D.THEME.small });
    const head = el("tr", { position: "sticky", top: "0", background: D.THEME.panel });
    for (const c of TABLE_COLUMNS) {
      const arrow = this.sort.key === c.key ? (this.sort.dir === "desc" ? " ▼" : " ▲") : "";
      const th = el("th", { cursor: "pointer", padding: "2px 4px", textAlign: c.type === "num" ? "right" : "left",
        whiteSpace: "nowrap" }, { textContent: c.label + arrow });
      th.onclick = () => { this.sort = D.nextSort(this.sort, c.key); this.drawTable(); };
      head.append(th);
    }
    t.append(head);
    for (const r of rows) {
      const tr = el("tr", { cursor: "pointer", borderTop: "1px solid #2c3038" });
      tr.title = r.note || r.name;
      tr.onclick = () => { this.selected = r.name; this.tab = "Spectrum"; this.render(); };
      for (const c of TABLE_COLUMNS) {
        const val = r[c.key];
        const td = el("td", { padding: "1px 4px", textAlign: c.type === "num" ? "right" : "left", whiteSpace: "nowrap",
          maxWidth: c.key === "name" ? "260px" : "", overflow: "hidden", textOverflow: "ellipsis" },
        { textContent: c.type === "num" ? D.fmt(val) : String(val ?? "-") });
        tr.append(td);
      }
      t.append(tr);
    }
    this.table.replaceChildren(t);
  }

  hover(ev) {
    if (!this.hits || this.drag) return;
    const rect = this.canvas.getBoundingClientRect();
    const px = ev.clientX - rect.left;
    const py = ev.clientY - rect.top;
    let text = null;
    if (this.hits.kind === "bars") {
      const b = this.hits.bars.find((b) => px >= b.x && px <= b.x + b.w && py >= b.y - 4);
      if (b) text = `${b.item.label}: ${b.item.value.toFixed(2)} % (${b.item.block.modules} modules)`;
    } else if (this.hits.kind === "cells") {
      const c = D.cellAt(this.hits.geom, px, py);
      if (c) text = `${this.hits.group.names[c.i]} ↔ ${this.hits.group.names[c.j]}: ${this.hits.group.matrix[c.i][c.j].toFixed(3)}`;
    } else if (this.hits.kind === "points") {
      const i = D.nearestPoint(this.hits.proj, px, py);
      if (i >= 0) text = this.view.map.names[i];
    }
    if (!text) { this.tip.style.display = "none"; return; }
    this.tip.textContent = text;
    this.tip.style.display = "block";
    this.tip.style.left = `${Math.min(px + 10, this.body.clientWidth - 200)}px`;
    this.tip.style.top = `${py + 12}px`;
  }

  dragStart(ev) {
    if (this.tab !== "Map") return;
    ev.stopPropagation();
    ev.preventDefault();
    let last = { x: ev.clientX, y: ev.clientY };
    this.drag = true;
    const move = (e) => {
      this.view3d = D.orbit(this.view3d, { dx: e.clientX - last.x, dy: e.clientY - last.y });
      last = { x: e.clientX, y: e.clientY };
      this.render();
    };
    const up = () => {
      this.drag = false;
      window.removeEventListener("pointermove", move);
      window.removeEventListener("pointerup", up);
    };
    window.addEventListener("pointermove", move);
    window.addEventListener("pointerup", up);
  }
}

function dashboardOf(node) {
  if (node.__lensDashboard) return node.__lensDashboard;
  const dash = new AnalysisDashboard();
  const widget = node.addDOMWidget("lens_dashboard", "lens_dashboard", dash.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => HEIGHT,
    getMaxHeight: () => HEIGHT,
  });
  widget.computeSize = (width) => [width, HEIGHT + 10];
  node.__lensDashboard = dash;
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], 620), Math.max(node.size[1], size[1])]);
  return dash;
}

app.registerExtension({
  name: "LoRALens.Views",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "AnalyzeLoRA") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const payload = message?.lens_analysis?.[0];
      if (!payload) return;
      const dash = dashboardOf(this);
      dash.setReport(payload);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
