"""The dataset registry refuses a second entry of a name, as the model and strategy registries do."""
from __future__ import annotations

import dataclasses

import pytest

from cdabench.data import DATASETS, list_datasets
from cdabench.data.registry import register_dataset


def test_a_second_dataset_of_a_name_is_refused():
    before = list_datasets()
    with pytest.raises(ValueError, match=r"dataset 'digits' is already registered .*pick another name"):
        register_dataset(dataclasses.replace(DATASETS["digits"], layout="another digits"))
    assert list_datasets() == before
    assert DATASETS["digits"].layout.startswith("nothing: scikit-learn")
