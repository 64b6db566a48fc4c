"""Catalog: every timm + torchvision classifier, searchable, with true parameter counts."""
from __future__ import annotations

import random

from engine.models.catalog import catalog, count_params_meta, search
from engine.models.registry import timm_names, torchvision_names


def test_catalog_covers_both_libraries():
    entries = catalog()
    assert len(entries) == len(timm_names()) + len(torchvision_names())
    sources = {e.source for e in entries}
    assert sources == {"timm", "torchvision"}
    packaged = [e.name for e in entries if e.packaged]
    assert "timm:efficientnet_lite0" in packaged


def test_search_is_substring_and_case_insensitive():
    found = search("ResNet")
    names = {e.name for e in found}
    assert {"tv:resnet18", "timm:resnet18", "timm:resnet50"} <= names
    assert all("resnet" in e.name or "resnet" in e.family for e in found)
    assert all(e.params for e in found)
    assert {e.source for e in search("resnet", source="torchvision")} == {"torchvision"}
    assert [e.name for e in search("", packaged_only=True)][:1] == ["timm:efficientnet_lite0"]


def test_shipped_counts_match_meta_device_counts():
    by_name = {e.name: e for e in catalog()}
    assert by_name["tv:resnet18"].params == 11_689_512 == by_name["timm:resnet18"].params
    rng = random.Random(0)
    sample = rng.sample([e for e in by_name.values() if e.source == "timm" and "test_" in e.arch], 3)
    sample += [by_name["tv:mobilenet_v3_small"], by_name["tv:regnet_y_400mf"]]
    for entry in sample:
        count_params_meta.cache_clear()
        assert count_params_meta(entry.name) == entry.params, entry.name
