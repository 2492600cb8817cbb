"""The usual host for the vITS tests: two pCPUs, 64 pITS slots, batches of four."""

from __future__ import annotations

import pytest

from tests.core.its.guest import its_host
from xenemu.core.host import Host
from xenemu.core.its import ItsHost


@pytest.fixture
def setup() -> tuple[Host, ItsHost]:
    return its_host()
