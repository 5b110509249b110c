import { test } from "node:test";
import assert from "node:assert/strict";
import { prepareReport, summaryLines, TABLE_COLUMNS } from "../lib/lens_report.js";

const report = () => ({
  report: "lora-lens.analysis", version: 1,
  summary: { file: "x.safetensors", architecture: "SDXL", format: "kohya sd-scripts", precision: "fp16", modules: 2,
    modules_by_kind: { LoRA: 2 }, nominal_rank: 8, effective_rank_median: { 90: 2, 99: 4, 999: 6 } },
  scores: { efficiency: 42, health: 90 },
  compression: { file_bytes_now: 2 ** 21, file_bytes_at_effective_rank: 2 ** 20, saving_fraction: 0.5 },
  findings: [{ id: "x", severity: "warning", title: "T", text: "t", evidence: {} }],
  blocks: { total_energy: 4, target_share: 0.9, smallest_set: ["input 1"],
    blocks: { "input 1": { share: 0.75, energy: 3, modules: 1, component: "unet", mean_frobenius: 1.7 },
              te1: { share: 0.25, energy: 1, modules: 1, component: "te1", mean_frobenius: 1 } } },
  similarity: [{ shape: [4, 4], modules: ["a", "b"], matrix: [[1, 0.5], [0.5, 1]], method: "exact" }],
  map: { modules: ["a", "b"], points: [[0, 0, 0], [1, 1, 1]], outliers: ["b"], explained: [0.7, 0.2, 0.1], outlier_score: [0, 5] },
  histogram: { edges: [-1, 0, 1], counts: [3, 4], under: 0, over: 1 },
  modules: {
    a: { kind: "lora", block: "input 1", rank: 8, alpha: 4, effective_rank_90: 2, effective_rank_99: 4, effective_rank_999: 6,
      singular_values: [2, 1], spectral_norm: 2, frobenius_norm: Math.sqrt(3) * 1, energy: 3,
      elements: { excess_kurtosis: 0.5, near_zero_fraction: 0.01, histogram: { lo: -1, hi: 1, counts: [1, 2] } } },
    b: { kind: "glora", block: "te1", rank: null, alpha: null, effective_rank_90: null, effective_rank_99: null,
      effective_rank_999: null, singular_values: null, note: "base weight" },
  },
});

test("prepareReport reads a report string into rows, spectra, blocks, map", () => {
  const v = prepareReport(JSON.stringify(report()));
  assert.equal(v.rows.length, 2);
  const a = v.rows.find((r) => r.name === "a");
  assert.equal(a.share, 75);
  assert.equal(a.nearZero, 1);
  assert.deepEqual(v.spectra.get("a"), [2, 1]);
  assert.deepEqual(v.spectra.get("b"), []);
  assert.equal(v.rows.find((r) => r.name === "b").fro, null);
  assert.deepEqual(v.blocks.map((b) => b.name), ["input 1", "te1"]);
  assert.ok(v.map.outliers.has("b"));
  assert.deepEqual(v.moduleHistogram("a").counts, [1, 2]);
  assert.equal(v.moduleHistogram("b"), null);
  for (const c of TABLE_COLUMNS) assert.ok(c.key in a, c.key);
});

test("prepareReport refuses other JSON and names a missing field", () => {
  assert.throws(() => prepareReport("{}"), /not a LoRA Lens analysis report/);
  const r = report();
  delete r.blocks.smallest_set;
  assert.throws(() => prepareReport(r), /blocks\.smallest_set/);
});

test("summary lines carry scores' context and the compression estimate", () => {
  const lines = summaryLines(prepareReport(report()));
  assert.ok(lines.some((l) => l.includes("rank 8 → effective 2 / 4 / 6")));
  assert.ok(lines.some((l) => l.includes("1.0 MiB instead of 2.0 MiB (50 % smaller)")));
  assert.ok(lines.some((l) => l.includes("1 of 2 blocks hold 90 %")));
});
