// LoRA Lens: show the text a node returns in its `ui.text` (summaries, reports, saved paths) inside the node.
// Nodes with their own drawn view (AnalyzeLoRA, PruneRank, ConflictScan) keep theirs.
import { app } from "../../scripts/app.js";
import { textHeight, textOf } from "./lib/lens_text.js";

const OWN_VIEW = new Set(["AnalyzeLoRA", "PruneRank", "ConflictScan"]);
const CATEGORY = "LoRA Lens";

function textWidget(node) {
  if (node.__lensText) return node.__lensText;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.className = "lens-text-view";
  Object.assign(box.style, {
    width: "100%", height: "100%", resize: "none", boxSizing: "border-box",
    font: "11px ui-monospace, SFMono-Regular, Menlo, monospace", lineHeight: "1.35",
    background: "var(--comfy-input-bg, #222)", color: "var(--input-text, #ddd)",
    border: "1px solid var(--border-color, #444)", borderRadius: "4px", padding: "4px 6px",
  });
  node.addDOMWidget("lens_text", "lens_text", box, { serialize: false, getMinHeight: () => 120 });
  node.__lensText = box;
  return box;
}

app.registerExtension({
  name: "LoRALens.TextView",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData.category || "").startsWith(CATEGORY) || OWN_VIEW.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = textOf(message);
      if (text === null) return;
      const box = textWidget(this);
      box.value = text;
      this.setSize([Math.max(this.size[0], 420), Math.max(this.size[1], this.computeSize()[1], textHeight(text))]);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
