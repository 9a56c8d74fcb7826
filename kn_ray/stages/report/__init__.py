"""`kn-ray report`: the corpus numbers (analytics, DuckDB over the Parquet tables), their
figures (figures, matplotlib) and the HTML page (html). `Analytics` is importable from here
without matplotlib."""

from kn_ray.stages.report.analytics import ALL, Analytics

__all__ = ["ALL", "Analytics"]
