"""A real PostgreSQL for the cluster tests: one throwaway server per test
session (started on first use), a fresh database per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest

from roost.cluster.devdb import PostgresUnavailable, ThrowawayPostgres, find_bindir

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[ThrowawayPostgres]:
    if find_bindir() is None and not os.environ.get("ROOST_REQUIRE_POSTGRES"):
        pytest.skip("PostgreSQL server binaries not installed (Debian: postgresql)")
    try:
        server = ThrowawayPostgres()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))
    with server:
        yield server


@pytest.fixture
def pg_url(postgres_server: ThrowawayPostgres) -> Iterator[str]:
    """The URL of an empty database of its own."""
    name = f"t{os.getpid()}_{next(_databases)}"
    admin = postgres_server.url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    yield admin.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


@pytest.fixture
def own_postgres() -> Iterator[ThrowawayPostgres]:
    """A server of the test's own, which it may crash, pause or restart."""
    if find_bindir() is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian: postgresql)")
    with ThrowawayPostgres() as pg:
        yield pg
