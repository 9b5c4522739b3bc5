"""Real data for cdabench: official dataset layouts, lazily decoded splits, seeded holdouts."""

from .errors import DataError
from .images import IMAGE_EXTENSIONS, ImageSplit, load_imagefolder
from .registry import DATASETS, DatasetSpec, RealData, create_dataset, get_spec, list_datasets
from .splits import stratified_holdout

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetSpec",
    "IMAGE_EXTENSIONS",
    "ImageSplit",
    "RealData",
    "create_dataset",
    "get_spec",
    "list_datasets",
    "load_imagefolder",
    "stratified_holdout",
]
