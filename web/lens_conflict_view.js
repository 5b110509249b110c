// LoRA Lens: draws ConflictScan's conflict map (blocks × metrics) inside the node after it runs.
// Data arrives in the node's ui output as `lens_conflict[0]` = {blocks, metrics, values, badness, overall,
// ratio, stability, problems}. Colours, theme and number format come from ./lib/lens_draw.js.
import { app } from "../../scripts/app.js";
import * as D from "./lib/lens_draw.js";

const HEAD = { conflict: "conflict", cosine: "cosine", subspace_overlap: "subspace", energy_overlap: "energy",
  interference: "interf.", norm_balance: "balance" };
const ROW_H = 14, HEAD_H = 18, LABEL_W = 74, PAD = 8, FOOT_H = 18;

function ramp(x) {  // green (fine) → yellow → red (conflict)
  if (x === null || x === undefined || Number.isNaN(x)) return D.THEME.grid;
  return D.rampColor(x);
}

function fmt(metric, v) {
  if (v === null || v === undefined) return "–";
  return metric === "cosine" ? (v >= 0 ? "+" : "") + v.toFixed(2) : v.toFixed(2);
}

function mapHeight(data) {
  return HEAD_H + ROW_H * data.blocks.length + FOOT_H + 2 * PAD;
}

export function drawMap(ctx, node, data, top) {
  const width = node.size[0] - 2 * PAD;
  const cols = data.metrics.length;
  const cellW = Math.max(24, (width - LABEL_W) / cols);
  ctx.save();
  ctx.font = D.THEME.small;
  ctx.textBaseline = "middle";
  ctx.fillStyle = D.THEME.bg;
  ctx.fillRect(PAD, top, width, mapHeight(data) - PAD);
  ctx.fillStyle = D.THEME.text;
  data.metrics.forEach((m, j) => ctx.fillText(HEAD[m] || m, PAD + LABEL_W + j * cellW + 3, top + HEAD_H / 2));
  data.blocks.forEach((b, i) => {
    const y = top + HEAD_H + i * ROW_H;
    ctx.fillStyle = D.THEME.text;
    ctx.fillText(b, PAD + 3, y + ROW_H / 2);
    data.metrics.forEach((m, j) => {
      const v = data.values[i][j];
      const bad = data.badness[i][j];
      const x = PAD + LABEL_W + j * cellW;
      ctx.fillStyle = m === "norm_balance" ? (v === null ? "#404040" : `rgb(70,${Math.round(80 + 60 * v)},${Math.round(110 + 120 * v)})`) : ramp(bad);
      ctx.fillRect(x + 1, y + 1, cellW - 2, ROW_H - 2);
      if (cellW > 34) {
        ctx.fillStyle = "#111";
        ctx.fillText(fmt(m, v), x + 4, y + ROW_H / 2);
      }
    });
  });
  const fy = top + HEAD_H + data.blocks.length * ROW_H + FOOT_H / 2 + 2;
  ctx.fillStyle = data.stability === "unstable" ? D.THEME.bad : data.stability === "caution" ? D.THEME.warn : D.THEME.good;
  ctx.fillText(`score ${D.fmt(data.overall)} · ratio ${data.ratio} · ${data.stability} · ${data.problems} problem layer(s)`,
    PAD + 3, fy);
  ctx.restore();
}

app.registerExtension({
  name: "LoRALens.ConflictView",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "ConflictScan") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const data = message?.lens_conflict?.[0];
      if (!data || !Array.isArray(data.blocks)) return;
      this._lensConflict = data;
      this._lensConflictBase = this._lensConflictBase || this.computeSize()[1];
      const need = this._lensConflictBase + mapHeight(data);
      this.setSize([Math.max(this.size[0], 460), Math.max(this.size[1], need)]);
      this.setDirtyCanvas(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      const data = this._lensConflict;
      if (!data || this.flags?.collapsed) return;
      const top = Math.max(this._lensConflictBase || 0, this.size[1] - mapHeight(data));
      drawMap(ctx, this, data, top);
    };
  },
});
