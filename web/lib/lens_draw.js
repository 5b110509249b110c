// LoRA Lens drawing library: small pure functions that draw charts on a CanvasRenderingContext2D
// (or anything with the same methods). No DOM lookups, no globals: the analysis, prune, conflict and
// collection views all reuse it, and `node --test web/tests/` tests it with a recording context.

export const THEME = {
  bg: "#1b1d22", panel: "#23262d", grid: "#3a3f4a", text: "#d8dbe2", muted: "#8a90a0",
  accent: "#4cc9f0", warn: "#f6bd60", bad: "#ef476f", good: "#06d6a0",
  font: "11px sans-serif", small: "10px sans-serif",
};

const VIRIDIS = [[68, 1, 84], [72, 36, 117], [65, 68, 135], [53, 95, 141], [42, 120, 142], [33, 145, 140],
  [34, 168, 132], [68, 191, 112], [122, 209, 81], [189, 223, 38], [253, 231, 37]];
const DIVERGING = [[59, 76, 192], [120, 150, 235], [190, 200, 230], [221, 221, 221], [236, 190, 170],
  [220, 120, 95], [180, 4, 38]];

const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));

function ramp(stops, t) {
  if (!Number.isFinite(t)) return "rgb(90,90,90)";
  const v = clamp(t, 0, 1) * (stops.length - 1);
  const i = Math.min(Math.floor(v), stops.length - 2);
  const f = v - i;
  const c = stops[i].map((a, k) => Math.round(a * (1 - f) + stops[i + 1][k] * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

/** Viridis colour for t in 0..1 (NaN → grey). */
export const viridis = (t) => ramp(VIRIDIS, t);
/** Blue–grey–red colour for t in -1..1 (cosine similarities). */
export const diverging = (t) => ramp(DIVERGING, (clamp(t, -1, 1) + 1) / 2);

/** Linear scale: maps [d0,d1] onto [r0,r1]; `.invert` maps back. */
export function linearScale([d0, d1], [r0, r1]) {
  const span = d1 - d0 || 1;
  const f = (x) => r0 + ((x - d0) / span) * (r1 - r0);
  f.invert = (y) => d0 + ((y - r0) / (r1 - r0 || 1)) * span;
  return f;
}

/** Log10 scale for positive values (values ≤ 0 clamp to the domain's low end). */
export function logScale([d0, d1], range) {
  const lo = Math.log10(Math.max(d0, 1e-300));
  const hi = Math.log10(Math.max(d1, d0 * 10, 1e-300));
  const lin = linearScale([lo, hi], range);
  const f = (x) => lin(Math.log10(Math.max(x, d0, 1e-300)));
  f.invert = (y) => 10 ** lin.invert(y);
  return f;
}

/** "Nice" tick values covering [min, max] with about `count` ticks (1, 2, 5 × 10ⁿ steps). */
export function niceTicks(min, max, count = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [];
  if (min === max) return [min];
  if (min > max) [min, max] = [max, min];
  const raw = (max - min) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const start = Math.ceil(min / step - 1e-9) * step;
  const ticks = [];
  for (let v = start; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

/** Short number text: 3 significant digits, k/M suffixes, exponent for tiny values. */
export function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "-";
  if (typeof x !== "number") return String(x);
  const a = Math.abs(x);
  if (a === 0) return "0";
  if (a >= 1e6) return `${(x / 1e6).toPrecision(3)}M`;
  if (a >= 1e4) return `${(x / 1e3).toPrecision(3)}k`;
  if (a < 1e-3) return x.toExponential(2);
  return Number(x.toPrecision(3)).toString();
}

function frame(ctx, rect, title) {
  ctx.fillStyle = THEME.panel;
  ctx.fillRect(rect.x, rect.y, rect.w, rect.h);
  if (title) {
    ctx.fillStyle = THEME.text;
    ctx.font = THEME.font;
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText(title, rect.x + 6, rect.y + 4);
  }
  const top = title ? 20 : 6;
  return { x: rect.x + 44, y: rect.y + top, w: Math.max(1, rect.w - 52), h: Math.max(1, rect.h - top - 22) };
}

function axes(ctx, plot, yTicks, yScale, xTicks, xScale, yFmt = fmt) {
  ctx.strokeStyle = THEME.grid;
  ctx.lineWidth = 1;
  ctx.fillStyle = THEME.muted;
  ctx.font = THEME.small;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const t of yTicks) {
    const y = yScale(t);
    ctx.beginPath();
    ctx.moveTo(plot.x, y);
    ctx.lineTo(plot.x + plot.w, y);
    ctx.stroke();
    ctx.fillText(yFmt(t), plot.x - 4, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of xTicks || []) ctx.fillText(fmt(t), xScale(t), plot.y + plot.h + 4);
}

/**
 * Vertical bar chart. items: [{label, value, color?, highlight?}]. Returns the bars' rectangles
 * (for hit-testing tooltips).
 */
export function drawBarChart(ctx, rect, items, opts = {}) {
  const plot = frame(ctx, rect, opts.title);
  const max = opts.max ?? Math.max(1e-12, ...items.map((d) => d.value || 0));
  const y = linearScale([0, max], [plot.y + plot.h, plot.y]);
  axes(ctx, plot, niceTicks(0, max, 4), y, [], null, opts.yFormat || fmt);
  const n = Math.max(items.length, 1);
  const bw = plot.w / n;
  const bars = [];
  items.forEach((d, i) => {
    const x = plot.x + i * bw;
    const top = y(Math.max(0, d.value || 0));
    ctx.fillStyle = d.color || (d.highlight ? THEME.accent : THEME.muted);
    ctx.fillRect(x + bw * 0.1, top, Math.max(1, bw * 0.8), plot.y + plot.h - top);
    bars.push({ x: x + bw * 0.1, y: top, w: bw * 0.8, h: plot.y + plot.h - top, item: d });
  });
  ctx.save?.();
  ctx.fillStyle = THEME.muted;
  ctx.font = THEME.small;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const every = Math.ceil(n / Math.max(1, Math.floor(plot.w / 38)));
  items.forEach((d, i) => {
    if (i % every === 0) ctx.fillText(String(d.label).slice(0, 9), plot.x + (i + 0.5) * bw, plot.y + plot.h + 4);
  });
  ctx.restore?.();
  return bars;
}

/**
 * Line plot of one or more series: [{values, color, width?, label?}], x = index + 1.
 * opts.logY draws log10 values; opts.markers: [{x, color}] vertical lines (e.g. effective ranks).
 */
export function drawLinePlot(ctx, rect, series, opts = {}) {
  const plot = frame(ctx, rect, opts.title);
  const all = series.flatMap((s) => s.values).filter((v) => Number.isFinite(v) && (!opts.logY || v > 0));
  const n = Math.max(2, ...series.map((s) => s.values.length));
  const x = linearScale([1, n], [plot.x, plot.x + plot.w]);
  if (!all.length) return { plot, x, y: null };
  let lo = Math.min(...all);
  const hi = Math.max(...all);
  let y;
  let ticks;
  if (opts.logY) {
    lo = Math.max(lo, hi * 1e-6);
    y = logScale([lo, hi], [plot.y + plot.h, plot.y]);
    ticks = niceTicks(Math.floor(Math.log10(lo)), Math.ceil(Math.log10(hi)), 4).map((p) => 10 ** p)
      .filter((t) => t >= lo / 1.0001 && t <= hi * 1.0001);
  } else {
    y = linearScale([Math.min(0, lo), hi], [plot.y + plot.h, plot.y]);
    ticks = niceTicks(Math.min(0, lo), hi, 4);
  }
  axes(ctx, plot, ticks, y, niceTicks(1, n, 6).filter((t) => t >= 1), x);
  for (const m of opts.markers || []) {
    ctx.strokeStyle = m.color || THEME.warn;
    ctx.beginPath();
    ctx.moveTo(x(m.x), plot.y);
    ctx.lineTo(x(m.x), plot.y + plot.h);
    ctx.stroke();
  }
  for (const s of series) {
    ctx.strokeStyle = s.color || THEME.accent;
    ctx.lineWidth = s.width || 1.5;
    ctx.beginPath();
    let started = false;
    s.values.forEach((v, i) => {
      if (!Number.isFinite(v) || (opts.logY && v <= 0)) return;
      const px = x(i + 1);
      const py = y(opts.logY ? Math.max(v, lo) : v);
      if (!started) { ctx.moveTo(px, py); started = true; } else ctx.lineTo(px, py);
    });
    ctx.stroke();
  }
  ctx.lineWidth = 1;
  return { plot, x, y };
}

/** Histogram from bin counts and edges (edges.length = counts.length + 1). */
export function drawHistogram(ctx, rect, counts, edges, opts = {}) {
  const plot = frame(ctx, rect, opts.title);
  const max = Math.max(1, ...counts);
  const y = opts.logY ? logScale([1, max], [plot.y + plot.h, plot.y]) : linearScale([0, max], [plot.y + plot.h, plot.y]);
  const x = linearScale([edges[0], edges[edges.length - 1]], [plot.x, plot.x + plot.w]);
  axes(ctx, plot, opts.logY ? [1, 10, 100, 1000, 1e4, 1e5, 1e6].filter((t) => t <= max) : niceTicks(0, max, 4), y,
    niceTicks(edges[0], edges[edges.length - 1], 6), x);
  ctx.fillStyle = opts.color || THEME.accent;
  counts.forEach((c, i) => {
    if (!c) return;
    const x0 = x(edges[i]);
    const x1 = x(edges[i + 1]);
    const top = y(c);
    ctx.fillRect(x0, top, Math.max(1, x1 - x0 - 1), plot.y + plot.h - top);
  });
  return { plot, x, y };
}

/** Binned counts of values into `bins` equal bins over [lo, hi] (values outside are dropped). */
export function binValues(values, bins, lo, hi) {
  const counts = new Array(bins).fill(0);
  const span = hi - lo || 1;
  for (const v of values) {
    if (!Number.isFinite(v) || v < lo || v > hi) continue;
    counts[Math.min(bins - 1, Math.floor(((v - lo) / span) * bins))] += 1;
  }
  const edges = Array.from({ length: bins + 1 }, (_, i) => lo + (i * span) / bins);
  return { counts, edges };
}

/**
 * Heatmap of a matrix (rows × cols) with a colour function of the value; returns the cell size and
 * origin for hit-testing (cellAt).
 */
export function drawHeatmap(ctx, rect, matrix, opts = {}) {
  const plot = frame(ctx, rect, opts.title);
  const rows = matrix.length;
  const cols = rows ? matrix[0].length : 0;
  const color = opts.color || ((v) => diverging(v));
  const side = Math.min(plot.w / Math.max(cols, 1), plot.h / Math.max(rows, 1));
  const ox = plot.x;
  const oy = plot.y;
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      ctx.fillStyle = color(matrix[i][j]);
      ctx.fillRect(ox + j * side, oy + i * side, Math.ceil(side), Math.ceil(side));
    }
  }
  return { x: ox, y: oy, cell: side, rows, cols };
}

/** Matrix cell under a point, or null (geometry from drawHeatmap). */
export function cellAt(geom, px, py) {
  const j = Math.floor((px - geom.x) / geom.cell);
  const i = Math.floor((py - geom.y) / geom.cell);
  return i >= 0 && j >= 0 && i < geom.rows && j < geom.cols ? { i, j } : null;
}

/** Compare for sorting: numbers numerically, null/NaN last, text case-insensitively. */
export function compareValues(a, b) {
  const na = a === null || a === undefined || (typeof a === "number" && Number.isNaN(a));
  const nb = b === null || b === undefined || (typeof b === "number" && Number.isNaN(b));
  if (na || nb) return na === nb ? 0 : na ? 1 : -1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, { numeric: true, sensitivity: "base" });
}

/** A sorted copy of rows by `key`; dir "asc" | "desc"; missing values always last; stable. */
export function sortRows(rows, key, dir = "desc") {
  const sign = dir === "asc" ? 1 : -1;
  return rows.map((r, i) => [r, i]).sort(([a, ia], [b, ib]) => {
    const va = a[key];
    const vb = b[key];
    const missA = va === null || va === undefined || Number.isNaN(va);
    const missB = vb === null || vb === undefined || Number.isNaN(vb);
    if (missA || missB) return missA === missB ? ia - ib : missA ? 1 : -1;
    return sign * compareValues(va, vb) || ia - ib;
  }).map(([r]) => r);
}

/** Next sort state when a column header is clicked: new column → desc, same column → toggled. */
export function nextSort(state, key) {
  return state && state.key === key ? { key, dir: state.dir === "desc" ? "asc" : "desc" } : { key, dir: "desc" };
}

/**
 * 3-D → 2-D projection of points [[x,y,z],...] for a view {yaw, pitch, zoom} into rect. Points are
 * centred and scaled to fit, rotated (yaw about y, then pitch about x), and put in perspective.
 * Returns [{x, y, depth, index}] sorted far-to-near (draw in this order).
 */
export function project3D(points, view, rect) {
  const n = points.length;
  if (!n) return [];
  const c = [0, 1, 2].map((k) => points.reduce((s, p) => s + p[k], 0) / n);
  const radius = Math.max(1e-12, ...points.map((p) => Math.hypot(p[0] - c[0], p[1] - c[1], p[2] - c[2])));
  const cy = Math.cos(view.yaw || 0), sy = Math.sin(view.yaw || 0);
  const cp = Math.cos(view.pitch || 0), sp = Math.sin(view.pitch || 0);
  const zoom = view.zoom || 1;
  const half = Math.min(rect.w, rect.h) / 2;
  const out = points.map((p, index) => {
    const x = (p[0] - c[0]) / radius, y = (p[1] - c[1]) / radius, z = (p[2] - c[2]) / radius;
    const x1 = cy * x + sy * z;
    const z1 = -sy * x + cy * z;
    const y2 = cp * y - sp * z1;
    const z2 = sp * y + cp * z1;
    const persp = 3 / (3 + z2);
    return { x: rect.x + rect.w / 2 + x1 * persp * half * 0.8 * zoom,
             y: rect.y + rect.h / 2 - y2 * persp * half * 0.8 * zoom, depth: z2, index };
  });
  return out.sort((a, b) => b.depth - a.depth);
}

/** Update a 3-D view for a mouse drag (dx, dy in pixels) or a wheel step (deltaY). */
export function orbit(view, { dx = 0, dy = 0, wheel = 0 } = {}) {
  return {
    yaw: (view.yaw || 0) + dx * 0.01,
    pitch: clamp((view.pitch || 0) + dy * 0.01, -Math.PI / 2, Math.PI / 2),
    zoom: clamp((view.zoom || 1) * Math.exp(-wheel * 0.001), 0.2, 20),
  };
}

/** Scatter of projected points with colours; returns the projection for hit-testing (nearest). */
export function drawPoints3D(ctx, rect, points, view, opts = {}) {
  const plot = frame(ctx, rect, opts.title);
  const proj = project3D(points, view, plot);
  for (const p of proj) {
    ctx.fillStyle = opts.color ? opts.color(p.index) : THEME.accent;
    const r = (opts.radius ? opts.radius(p.index) : 3) * (3 / (3 + p.depth));
    ctx.beginPath();
    ctx.arc(p.x, p.y, Math.max(1, r), 0, Math.PI * 2);
    ctx.fill();
  }
  return proj;
}

/** Index of the projected point nearest to (px, py) within `maxDist` pixels, or -1. */
export function nearestPoint(proj, px, py, maxDist = 8) {
  let best = -1;
  let bd = maxDist;
  for (const p of proj) {
    const d = Math.hypot(p.x - px, p.y - py);
    if (d <= bd) { bd = d; best = p.index; }
  }
  return best;
}

/** Horizontal gauge for a 0–100 score with a label. */
export function drawScore(ctx, rect, label, score) {
  ctx.fillStyle = THEME.panel;
  ctx.fillRect(rect.x, rect.y, rect.w, rect.h);
  const t = clamp((score ?? 0) / 100, 0, 1);
  ctx.fillStyle = t >= 0.7 ? THEME.good : t >= 0.4 ? THEME.warn : THEME.bad;
  ctx.fillRect(rect.x, rect.y + rect.h - 6, rect.w * t, 6);
  ctx.fillStyle = THEME.text;
  ctx.font = "bold 20px sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillText(`${Math.round(score ?? 0)}`, rect.x + 8, rect.y + 6);
  ctx.font = THEME.font;
  ctx.fillStyle = THEME.muted;
  ctx.fillText(label, rect.x + 8, rect.y + 30);
}

/** Lines of text wrapped to a width (measureText of the context). */
export function wrapText(ctx, text, width) {
  const words = String(text).split(/\s+/);
  const lines = [];
  let line = "";
  for (const w of words) {
    const trial = line ? `${line} ${w}` : w;
    if (line && ctx.measureText(trial).width > width) {
      lines.push(line);
      line = w;
    } else line = trial;
  }
  if (line) lines.push(line);
  return lines;
}

const TRAFFIC = [[40, 180, 90], [150, 200, 60], [235, 200, 50], [240, 130, 50], [225, 50, 60]];
/** Good→bad colour for x in 0..1 (green, yellow, red; NaN → grey): conflict and risk scales. */
export const rampColor = (x) => ramp(TRAFFIC, x);
