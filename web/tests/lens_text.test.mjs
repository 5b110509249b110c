import { test } from "node:test";
import assert from "node:assert/strict";
import { textHeight, textOf } from "../lib/lens_text.js";

test("textOf joins the ui.text items and ignores the rest", () => {
  assert.equal(textOf({ text: ["a", "b"] }), "a\n\nb");
  assert.equal(textOf({ text: [1, "x"] }), "x");
  assert.equal(textOf({ text: [] }), null);
  assert.equal(textOf({}), null);
  assert.equal(textOf(undefined), null);
});

test("textHeight grows with lines and is capped", () => {
  assert.equal(textHeight("one"), 125);
  assert.ok(textHeight("a\nb\nc") > textHeight("a"));
  assert.equal(textHeight("x\n".repeat(100)), 110 + 24 * 15);
});
