"""``nla-pipeline report``: one self-contained HTML page for a run (see pipeline.report.build)."""
from pipeline.report.build import write_report

__all__ = ["write_report"]
