"""Fixtures the unit tests share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from podshim.system import reaper


@pytest.fixture
async def installed_reaper() -> AsyncIterator[None]:
    """The shim's reaper, on the test's loop: for tests that spawn and reap real children."""
    reaper.REAPER.install(asyncio.get_running_loop())
    yield
    reaper.REAPER.uninstall()
