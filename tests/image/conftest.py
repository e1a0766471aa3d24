"""The container image tests run only from `make image-test` (scripts/image-test.sh), which
builds the image with podman first and sets SPYRUS_IMAGE_TEST, IMAGE and PODMAN; a plain
`pytest tests` skips them."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SPYRUS_IMAGE_TEST") == "1":
        return
    skip = pytest.mark.skip(reason="container image test: run 'make image-test' (builds the image with podman)")
    for item in items:
        if "image" in item.keywords:
            item.add_marker(skip)
