"""`kn-ray aggregate`: knowledge neurons per fact and relation (stage) and their schemas (tables)."""

from kn_ray.stages.aggregate.stage import AggregateParams, aggregate
from kn_ray.stages.aggregate.tables import KNOWLEDGE_NEURONS, RELATION_NEURONS

__all__ = ["AggregateParams", "aggregate", "KNOWLEDGE_NEURONS", "RELATION_NEURONS"]
