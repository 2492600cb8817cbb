"""Every core test runs twice: with the compiled fast path and with the Python handlers only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.bed import FAST_PATH


@pytest.fixture(autouse=True, params=[True, False], ids=["fast", "python"])
def fast_path(request: pytest.FixtureRequest) -> Iterator[bool]:
    FAST_PATH["on"] = request.param
    yield request.param
    FAST_PATH["on"] = True
