"""Shared test set-up. tests/ mirrors the package: tests/core/ (pure: runs as any user, in
seconds), tests/fastpath/, tests/io/, tests/agent/, tests/cmd/, tests/lab/, tests/bench/.

Markers, declared once here instead of a skip condition in each file:
- ``root``: the test builds network namespaces, TAPs or bridges (the lab): skipped unless root;
- ``etcd``: the test runs a real etcd: skipped unless etcd and etcdctl are installed.
The ``labs`` fixture builds labs (overlay.lab.Lab, named uniquely for this run) and tears them
down after the test, also when it fails: ``lab = labs(hosts=3)``, ``lab, etcd = labs.with_etcd(2)``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from hypothesis import settings

from tests.labkit import Labs

settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ETCD_TOOLS = ("etcd", "etcdctl")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root (network namespaces, TAPs, bridges); skipped otherwise")
    config.addinivalue_line("markers", "etcd: runs a real etcd; skipped unless etcd and etcdctl are installed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    not_root = pytest.mark.skip(reason="needs root (network namespaces): run as root, e.g. scripts/test")
    no_etcd = pytest.mark.skip(reason="needs etcd: apt-get install etcd-server etcd-client (scripts/setup does)")
    have_etcd = all(shutil.which(tool) for tool in ETCD_TOOLS)
    for item in items:
        if item.get_closest_marker("root") and os.geteuid() != 0:
            item.add_marker(not_root)
        if item.get_closest_marker("etcd") and not have_etcd:
            item.add_marker(no_etcd)


@pytest.fixture
def labs() -> Iterator[Labs]:
    with ExitStack() as stack:
        yield Labs(stack)
