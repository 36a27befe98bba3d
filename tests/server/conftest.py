"""Fixtures of the end-to-end server tests: the real `radixserve serve` as a subprocess on a free port.

One default server (prefix-cache report and metrics on) is shared by most tests; the few tests that need
other flags start their own small server (module scope), so that at most five servers start in a run
(one of them serves the default embedding model)."""
from __future__ import annotations

import pytest
from server_util import run_server

DEFAULT_FLAGS = ("--enable-cache-report", "--enable-metrics")


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("server-logs"))


@pytest.fixture(scope="session")
def launch_server(server_logs):
    """launch_server(*flags, api_key=None): a context manager that runs one more server."""

    def launch(*flags: str, api_key: str | None = None):
        return run_server(server_logs, *flags, api_key=api_key)

    return launch


@pytest.fixture(scope="session")
def server(launch_server):
    with launch_server(*DEFAULT_FLAGS) as s:
        yield s


@pytest.fixture(scope="session")
def model(server) -> str:
    return server.model


@pytest.fixture(scope="session")
def client(server):
    c = server.client()
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(server):
    with server.http() as c:
        yield c

