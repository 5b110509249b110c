// Reads the AnalyzeLoRA report (the JSON string the node returns and sends in ui.lens_analysis) into
// the plain arrays the dashboard draws. Pure: no DOM, no ComfyUI; tested under `node --test`.

const need = (obj, path) => {
  let cur = obj;
  for (const key of path.split(".")) {
    if (cur === null || typeof cur !== "object" || !(key in cur)) {
      throw new Error(`The analysis report has no "${path}" field; re-run the AnalyzeLoRA node with this version of LoRA Lens.`);
    }
    cur = cur[key];
  }
  return cur;
};

export const TABLE_COLUMNS = [
  { key: "name", label: "module", type: "text" },
  { key: "kind", label: "kind", type: "text" },
  { key: "block", label: "block", type: "text" },
  { key: "rank", label: "rank", type: "num" },
  { key: "alpha", label: "alpha", type: "num" },
  { key: "k90", label: "k90", type: "num" },
  { key: "k99", label: "k99", type: "num" },
  { key: "k999", label: "k99.9", type: "num" },
  { key: "spectral", label: "σ₁", type: "num" },
  { key: "fro", label: "‖ΔW‖F", type: "num" },
  { key: "share", label: "energy %", type: "num" },
  { key: "kurtosis", label: "kurtosis", type: "num" },
  { key: "nearZero", label: "near-0 %", type: "num" },
];

export function prepareReport(input) {
  const rep = typeof input === "string" ? JSON.parse(input) : input;
  if (!rep || rep.report !== "lora-lens.analysis") {
    throw new Error("This is not a LoRA Lens analysis report.");
  }
  const summary = need(rep, "summary");
  const scores = need(rep, "scores");
  const modules = need(rep, "modules");
  const blocksObj = need(rep, "blocks.blocks");
  const total = need(rep, "blocks.total_energy") || 1;
  const rows = [];
  const spectra = new Map();
  for (const [name, e] of Object.entries(modules)) {
    const el = e.elements || null;
    rows.push({
      name, kind: e.kind, block: e.block, rank: e.rank, alpha: e.alpha,
      k90: e.effective_rank_90, k99: e.effective_rank_99, k999: e.effective_rank_999,
      spectral: e.spectral_norm ?? null, fro: e.frobenius_norm ?? null,
      share: e.energy == null ? null : (100 * e.energy) / total,
      kurtosis: el ? el.excess_kurtosis : null,
      nearZero: el ? 100 * el.near_zero_fraction : null,
      note: e.note || "",
    });
    spectra.set(name, e.singular_values || []);
  }
  const blocks = Object.entries(blocksObj).map(([name, b]) => ({
    name, share: b.share, energy: b.energy, modules: b.modules, component: b.component,
    meanFro: b.mean_frobenius,
  }));
  const hist = need(rep, "histogram");
  const map = need(rep, "map");
  return {
    summary, scores, rows, spectra, blocks,
    smallestSet: need(rep, "blocks.smallest_set"),
    targetShare: need(rep, "blocks.target_share"),
    findings: need(rep, "findings"),
    compression: need(rep, "compression"),
    histogram: { edges: need(hist, "edges"), counts: need(hist, "counts"), under: hist.under, over: hist.over },
    similarity: need(rep, "similarity").map((g) => ({
      shape: g.shape, names: g.modules, matrix: g.matrix, method: g.method,
    })),
    map: { names: need(map, "modules"), points: need(map, "points"), outliers: new Set(map.outliers || []),
           explained: map.explained || [], score: map.outlier_score || [] },
    moduleHistogram(name) {
      const e = modules[name];
      return e && e.elements ? e.elements.histogram : null;
    },
  };
}

export function summaryLines(view) {
  const s = view.summary;
  const c = view.compression;
  const mib = (n) => `${(n / 2 ** 20).toFixed(1)} MiB`;
  const er = s.effective_rank_median || {};
  const lines = [
    `${s.file || "LoRA"} · ${s.architecture} · ${s.format} · ${s.precision}`,
    `${s.modules} modules (${Object.entries(s.modules_by_kind).map(([k, v]) => `${k} ${v}`).join(", ")})`,
    `rank ${s.nominal_rank ?? "n/a"} → effective ${er["90"] ?? "-"} / ${er["99"] ?? "-"} / ${er["999"] ?? "-"} (90/99/99.9 %)`,
    `at effective rank: ${mib(c.file_bytes_at_effective_rank)} instead of ${mib(c.file_bytes_now)} (${Math.round(100 * c.saving_fraction)} % smaller)`,
  ];
  if (view.smallestSet.length) {
    lines.push(`${view.smallestSet.length} of ${view.blocks.length} blocks hold ${Math.round(100 * view.targetShare)} % of ΔW energy`);
  }
  return lines;
}
