"""LoRA analysis: exact spectra from factors, statistics, blocks, similarity, scores and findings.

`analyze(model, device, progress)` returns the report dict the CLI prints, the AnalyzeLoRA node returns
as JSON and the web view draws; `format_report` / `llm_text` are its texts, `render_heatmap` its image.
"""
from .render import render_heatmap
from .report import analyze, analyze_file, format_report, format_table, llm_text

__all__ = ["analyze", "analyze_file", "format_report", "format_table", "llm_text", "render_heatmap"]
