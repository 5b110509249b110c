// LoRA Lens: draws PruneRank's per-module result inside the node after it runs.
// Data arrives in the node's ui output as `lens_prune[0]` (JSON text) =
// {recipe, threshold, total: {bytes_in, bytes_out, rel_error, snr_db, ...}, modules: [{name, block, old, new, err, snr, saved, note}]}.
// Shared drawing helpers come from ./lib/lens_draw.js (bar chart, colours, number format).
import { app } from "../../scripts/app.js";

let draw = null;
import("./lib/lens_draw.js").then((m) => { draw = m; }).catch(() => { draw = null; });

const PAD = 8, HEAD_H = 38, CHART_H = 120, STRIP_H = 70, GAP = 8;
const VIEW_H = HEAD_H + CHART_H + STRIP_H + 2 * GAP + 2 * PAD;

function mib(b) { return (b / 1048576).toFixed(2); }

function errColor(err) {  // 0 % → green, 20 %+ → red
  const t = Math.min(Math.max((err || 0) / 0.2, 0), 1);
  if (draw && typeof draw.rampColor === "function") return draw.rampColor(t);
  return `rgb(${Math.round(60 + 180 * t)},${Math.round(190 - 120 * t)},70)`;
}

export function blockSummary(modules) {
  const order = [], by = {};
  for (const m of modules) {
    if (!(m.block in by)) { by[m.block] = { label: m.block, old: 0, neu: 0, n: 0, err2: 0 }; order.push(m.block); }
    const b = by[m.block];
    if (m.old) { b.old += m.old; b.neu += m.new; b.n += 1; b.err2 += (m.err || 0) ** 2; }
  }
  return order.map((k) => by[k]).filter((b) => b.n > 0)
    .map((b) => ({ label: b.label, old: b.old / b.n, value: b.neu / b.n, err: Math.sqrt(b.err2 / b.n) }));
}

export function drawPrune(ctx, rect, data) {
  const t = data.total || {};
  ctx.save();
  ctx.fillStyle = draw?.THEME?.bg || "#1b1d22";
  ctx.fillRect(rect.x, rect.y, rect.w, rect.h);
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillStyle = "#e8e8e8";
  const snr = t.snr_db === null || t.snr_db === undefined ? "exact" : `${t.snr_db.toFixed(1)} dB`;
  ctx.fillText(`${data.recipe}: ${mib(t.bytes_in)} → ${mib(t.bytes_out)} MiB (−${(100 * (t.saved_fraction || 0)).toFixed(1)}%)`,
    rect.x + 4, rect.y + 4);
  ctx.fillStyle = "#bbb";
  ctx.fillText(`ΔW error ${(100 * (t.rel_error || 0)).toFixed(2)}% · SNR ${snr} · ${t.pruned || 0} pruned, ${t.kept || 0} kept, ` +
    `${t.removed || 0} removed, ${t.carried || 0} carried`, rect.x + 4, rect.y + 20);
  const blocks = blockSummary(data.modules || []);
  const chart = { x: rect.x, y: rect.y + HEAD_H, w: rect.w, h: CHART_H };
  const items = blocks.map((b) => ({ label: b.label, value: b.value, color: errColor(b.err) }));
  if (draw && typeof draw.drawBarChart === "function") {
    draw.drawBarChart(ctx, chart, items, { title: "mean new rank per block (colour: ΔW error)", max: Math.max(1, ...blocks.map((b) => b.old)) });
  } else {
    const max = Math.max(1, ...blocks.map((b) => b.old));
    const bw = chart.w / Math.max(1, items.length);
    items.forEach((d, i) => {
      const h = (chart.h - 14) * d.value / max;
      ctx.fillStyle = d.color;
      ctx.fillRect(chart.x + i * bw + 1, chart.y + chart.h - h, Math.max(1, bw - 2), h);
    });
  }
  // one thin bar per module: grey = old rank, coloured = new rank
  const mods = (data.modules || []).filter((m) => m.old);
  const sy = chart.y + CHART_H + GAP, sh = STRIP_H - 14;
  const maxOld = Math.max(1, ...mods.map((m) => m.old));
  const w = rect.w / Math.max(1, mods.length);
  mods.forEach((m, i) => {
    const x = rect.x + i * w;
    const ho = sh * m.old / maxOld, hn = sh * m.new / maxOld;
    ctx.fillStyle = "#3a3f4a";
    ctx.fillRect(x, sy + sh - ho, Math.max(1, w - (w > 3 ? 1 : 0)), ho);
    ctx.fillStyle = errColor(m.err);
    ctx.fillRect(x, sy + sh - hn, Math.max(1, w - (w > 3 ? 1 : 0)), hn);
  });
  ctx.fillStyle = "#999";
  ctx.font = "10px sans-serif";
  ctx.fillText(`${mods.length} modules in file order: grey = old rank, colour = new rank`, rect.x + 4, sy + sh + 2);
  ctx.restore();
}

app.registerExtension({
  name: "LoRALens.PruneView",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "PruneRank") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const raw = message?.lens_prune?.[0];
      if (!raw) return;
      let data;
      try { data = typeof raw === "string" ? JSON.parse(raw) : raw; } catch (e) { return; }
      if (!data || !Array.isArray(data.modules)) return;
      this._lensPrune = data;
      this._lensPruneBase = this._lensPruneBase || this.computeSize()[1];
      this.setSize([Math.max(this.size[0], 460), Math.max(this.size[1], this._lensPruneBase + VIEW_H)]);
      this.setDirtyCanvas(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      const data = this._lensPrune;
      if (!data || this.flags?.collapsed) return;
      const top = Math.max(this._lensPruneBase || 0, this.size[1] - VIEW_H) + PAD;
      drawPrune(ctx, { x: PAD, y: top, w: this.size[0] - 2 * PAD, h: VIEW_H - 2 * PAD }, data);
    };
  },
});
