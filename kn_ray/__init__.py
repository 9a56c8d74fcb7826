"""kn-ray: knowledge neurons at corpus scale.

The engine (`kn_ray.engine`) is pure torch/transformers; the pipeline (`kn_ray.pipeline`)
adds facts, planning, Ray execution and Parquet; the interfaces (`kn_ray.interfaces`) are
the `kn-ray` CLI and job specs; `kn_ray.stages` holds the downstream stages.

The engine's names are imported lazily, so stages that only read Parquet (aggregate,
report) do not pay for importing torch.
"""

__version__ = "0.1.0"

_ENGINE = ("Attribution", "Attributor", "LoadedModel", "Prober", "load_model")
__all__ = [*_ENGINE, "__version__"]


def __getattr__(name: str):
    if name in _ENGINE:
        from kn_ray import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'kn_ray' has no attribute {name!r}")
