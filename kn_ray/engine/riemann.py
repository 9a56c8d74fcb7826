"""Kept for imports written before `quadrature`; the rules live in `kn_ray.engine.quadrature`."""

from .quadrature import METHODS, quadrature, riemann  # noqa: F401
