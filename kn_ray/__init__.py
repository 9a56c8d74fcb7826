"""kn-ray: knowledge neurons at corpus scale.

The engine (`kn_ray.engine`) is pure torch/transformers; the pipeline (`kn_ray.pipeline`)
adds facts, planning, Ray execution and Parquet; the interfaces (`kn_ray.interfaces`) are
the `kn-ray` CLI and job specs; `kn_ray.stages` holds the downstream stages.
"""

__version__ = "0.1.0"

from kn_ray.engine import Attribution, Attributor, LoadedModel, load_model  # noqa: E402

__all__ = ["Attribution", "Attributor", "LoadedModel", "load_model", "__version__"]
