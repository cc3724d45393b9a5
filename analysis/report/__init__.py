"""What a reader sees: summary.md and summary.json, the figures, the ViT paper's table redrawn.
`analyse` runs the whole analysis (load, fits, figures, tables, summaries)."""

from analysis.report.build import analyse

__all__ = ["analyse"]
