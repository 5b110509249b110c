// Pure helpers for the text view (no DOM, no ComfyUI imports: tested with node --test).

/** The text a node sent in `ui.text` (several items joined by a blank line), or null when there is none. */
export function textOf(message) {
  const items = message?.text;
  if (!Array.isArray(items) || items.length === 0) return null;
  const strings = items.filter((t) => typeof t === "string");
  return strings.length ? strings.join("\n\n") : null;
}

/** Height in pixels the text box wants: a line per text line, capped. */
export function textHeight(text, lineHeight = 15, maxLines = 24, chrome = 110) {
  const lines = Math.min(maxLines, String(text).split("\n").length);
  return chrome + lines * lineHeight;
}
