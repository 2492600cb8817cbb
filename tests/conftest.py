from __future__ import annotations

import pytest

from tests.bed import Bed


@pytest.fixture
def bed() -> Bed:
    return Bed()
