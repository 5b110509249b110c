// node --test web/tests/ : the pure drawing and data helpers the LoRA Lens views share.
import { test } from "node:test";
import assert from "node:assert/strict";
import * as D from "../lib/lens_draw.js";

/** A CanvasRenderingContext2D stand-in that records every call. */
function recorder() {
  const calls = [];
  const ctx = new Proxy({ calls, measureText: (t) => ({ width: String(t).length * 6 }) }, {
    get(target, prop) {
      if (prop in target) return target[prop];
      return (...args) => { calls.push([prop, ...args]); };
    },
    set(target, prop, value) { calls.push([`set:${String(prop)}`, value]); return true; },
  });
  return ctx;
}
const rects = (ctx) => ctx.calls.filter((c) => c[0] === "fillRect");

test("linear and log scales map and invert", () => {
  const s = D.linearScale([0, 10], [100, 0]);
  assert.equal(s(0), 100);
  assert.equal(s(10), 0);
  assert.equal(s.invert(50), 5);
  const l = D.logScale([1, 1000], [0, 300]);
  assert.ok(Math.abs(l(10) - 100) < 1e-9 && Math.abs(l(100) - 200) < 1e-9);
  assert.ok(Math.abs(l.invert(200) - 100) < 1e-9);
});

test("nice ticks use 1/2/5 steps and cover the range", () => {
  assert.deepEqual(D.niceTicks(0, 10, 5), [0, 2, 4, 6, 8, 10]);
  assert.deepEqual(D.niceTicks(0, 1, 4), [0, 0.5, 1]);
  const t = D.niceTicks(-3.2, 17.9, 5);
  assert.ok(t[0] >= -3.2 && t[t.length - 1] <= 17.9 && t.length >= 4);
  for (let i = 1; i < t.length; i++) assert.ok(Math.abs(t[i] - t[i - 1] - 5) < 1e-9);
  assert.deepEqual(D.niceTicks(5, 5), [5]);
  assert.deepEqual(D.niceTicks(NaN, 1), []);
});

test("number formatting", () => {
  assert.equal(D.fmt(1234567), "1.23M");
  assert.equal(D.fmt(0.000012), "1.20e-5");
  assert.equal(D.fmt(null), "-");
  assert.equal(D.fmt(3.14159), "3.14");
});

test("colour maps clamp and grey out NaN", () => {
  assert.equal(D.viridis(0), "rgb(68,1,84)");
  assert.equal(D.viridis(1), "rgb(253,231,37)");
  assert.equal(D.viridis(5), D.viridis(1));
  assert.equal(D.viridis(NaN), "rgb(90,90,90)");
  assert.equal(D.diverging(-1), "rgb(59,76,192)");
  assert.equal(D.diverging(1), "rgb(180,4,38)");
  assert.equal(D.rampColor(0), "rgb(40,180,90)");
  assert.equal(D.rampColor(1), "rgb(225,50,60)");
});

test("bar chart: one bar per item, heights proportional to values", () => {
  const ctx = recorder();
  const bars = D.drawBarChart(ctx, { x: 0, y: 0, w: 400, h: 200 }, [{ label: "a", value: 1 }, { label: "b", value: 3 }]);
  assert.equal(bars.length, 2);
  assert.ok(Math.abs(bars[1].h / bars[0].h - 3) < 1e-9);
  assert.ok(bars[0].x < bars[1].x);
});

test("histogram draws one rectangle per non-empty bin and bins values", () => {
  const { counts, edges } = D.binValues([0, 0.1, 0.5, 0.99, 1, 2, -1], 2, 0, 1);
  assert.deepEqual(counts, [2, 3]);
  assert.deepEqual(edges, [0, 0.5, 1]);
  const ctx = recorder();
  D.drawHistogram(ctx, { x: 0, y: 0, w: 300, h: 150 }, [0, 4, 2], [0, 1, 2, 3]);
  // frame + 2 bars
  assert.equal(rects(ctx).length, 1 + 2);
});

test("heatmap colours each cell and finds the cell under the mouse", () => {
  const ctx = recorder();
  const m = [[1, -1], [0, 1]];
  const g = D.drawHeatmap(ctx, { x: 0, y: 0, w: 200, h: 200 }, m);
  assert.equal(rects(ctx).length, 1 + 4);
  const fills = ctx.calls.filter((c) => c[0] === "set:fillStyle").map((c) => c[1]);
  assert.ok(fills.includes(D.diverging(-1)) && fills.includes(D.diverging(1)));
  assert.deepEqual(D.cellAt(g, g.x + g.cell * 1.5, g.y + g.cell * 0.5), { i: 0, j: 1 });
  assert.equal(D.cellAt(g, g.x - 1, g.y), null);
});

test("line plot skips non-positive values on a log axis", () => {
  const ctx = recorder();
  const { y } = D.drawLinePlot(ctx, { x: 0, y: 0, w: 300, h: 200 }, [{ values: [10, 1, 0.1, 0, NaN] }], { logY: true });
  const lines = ctx.calls.filter((c) => c[0] === "lineTo" || c[0] === "moveTo");
  assert.ok(y(10) < y(1) && y(1) < y(0.1));
  assert.ok(lines.every((c) => Number.isFinite(c[1]) && Number.isFinite(c[2])));
});

test("sorting: numeric, text, missing values last, stable; header toggling", () => {
  const rows = [{ n: "b", v: 2 }, { n: "a", v: null }, { n: "c", v: 10 }, { n: "d", v: 2 }];
  assert.deepEqual(D.sortRows(rows, "v", "desc").map((r) => r.n), ["c", "b", "d", "a"]);
  assert.deepEqual(D.sortRows(rows, "v", "asc").map((r) => r.n), ["b", "d", "c", "a"]);
  assert.deepEqual(D.sortRows(rows, "n", "asc").map((r) => r.n), ["a", "b", "c", "d"]);
  assert.deepEqual(D.sortRows([{ n: "x10" }, { n: "x9" }], "n", "asc").map((r) => r.n), ["x9", "x10"]);
  assert.deepEqual(D.nextSort({ key: "v", dir: "desc" }, "v"), { key: "v", dir: "asc" });
  assert.deepEqual(D.nextSort({ key: "v", dir: "asc" }, "n"), { key: "n", dir: "desc" });
});

test("3-D projection: centred, rotation preserves distances from centre, far-to-near order, zoom scales", () => {
  const pts = [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]];
  const rect = { x: 0, y: 0, w: 200, h: 200 };
  const flat = D.project3D(pts, { yaw: 0, pitch: 0, zoom: 1 }, rect);
  assert.equal(flat.length, 6);
  for (let i = 1; i < flat.length; i++) assert.ok(flat[i - 1].depth >= flat[i].depth);
  const p0 = flat.find((p) => p.index === 0);
  const p1 = flat.find((p) => p.index === 1);
  assert.ok(Math.abs(p0.x - 100 - (100 - p1.x)) < 1e-9 && Math.abs(p0.y - 100) < 1e-9);
  const turned = D.project3D(pts, { yaw: Math.PI / 2, pitch: 0, zoom: 1 }, rect);
  // after a quarter turn about y, +x goes to depth -1 (towards the viewer) or +1
  assert.ok(Math.abs(Math.abs(turned.find((p) => p.index === 0).depth) - 1) < 1e-9);
  const zoomed = D.project3D(pts, { yaw: 0, pitch: 0, zoom: 2 }, rect);
  assert.ok(Math.abs((zoomed.find((p) => p.index === 0).x - 100) / (p0.x - 100) - 2) < 1e-9);
  assert.equal(D.nearestPoint(flat, p0.x + 1, p0.y), 0);
  assert.equal(D.nearestPoint(flat, 0, 0, 5), -1);
});

test("orbit: drag rotates, pitch is clamped, wheel zooms within limits", () => {
  const v = D.orbit({ yaw: 0, pitch: 0, zoom: 1 }, { dx: 100, dy: 1000 });
  assert.ok(Math.abs(v.yaw - 1) < 1e-12 && v.pitch === Math.PI / 2);
  assert.ok(D.orbit(v, { wheel: -500 }).zoom > 1 && D.orbit(v, { wheel: 1e6 }).zoom === 0.2);
});

test("text wrapping respects the width", () => {
  const ctx = recorder();
  const lines = D.wrapText(ctx, "one two three four five six", 60);
  assert.ok(lines.length >= 3 && lines.every((l) => l.length * 6 <= 60 || !l.includes(" ")));
  assert.equal(lines.join(" "), "one two three four five six");
});
