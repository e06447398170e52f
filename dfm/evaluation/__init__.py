"""Sample-quality metrics: FID, sFID, Inception Score, precision / recall (ADM's definitions), FDD on
DINOv2 features, and a small classifier-feature network for the digits."""

from dfm.evaluation.digits import digit_scores, digits_classifier
from dfm.evaluation.frechet import FeatureStats, frechet_distance
from dfm.evaluation.metrics import inception_score, precision_recall
from dfm.evaluation.npz import NpzImages, read_reference_stats

__all__ = [
    "FeatureStats",
    "NpzImages",
    "digit_scores",
    "digits_classifier",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "read_reference_stats",
]
