"""Fixtures shared by the runtime library's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from aeterna_common.db import Database, apply_migrations, role_of
from aeterna_memory.app import MIGRATIONS


@pytest_asyncio.fixture
async def pools(make_database: Any) -> AsyncIterator[tuple[Database, Database]]:
    """A fresh database with memory's schema (its ``usage_hourly`` and outbox): the
    application role's pool and the indexer role's pool."""
    urls = await make_database()
    await apply_migrations(urls.owner, MIGRATIONS, role_of(urls.app), role_of(urls.indexer))
    app = Database(urls.app, min_size=1, max_size=8)
    indexer = Database(urls.indexer, min_size=1, max_size=2)
    await app.open()
    await indexer.open()
    yield app, indexer
    await indexer.close()
    await app.close()
