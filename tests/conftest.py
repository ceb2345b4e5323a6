"""Shared test set-up. tests/ mirrors the package: tests/core/ (pure: runs as any user, in
seconds), tests/fastpath/, tests/io/, tests/agent/, tests/cmd/, tests/lab/, tests/bench/.

Markers, declared once here instead of a skip condition in each file:
- ``root``: the test builds network namespaces, TAPs or bridges (the lab): skipped unless root;
- ``etcd``: the test runs a real etcd: skipped unless etcd and etcdctl are installed.
The ``lab`` fixture builds a lab (overlay.lab.Lab) with a name unique to this run and tears it
down afterwards, also when the test fails: ``lab(hosts=3)``, ``lab(hosts=2, etcd=True)``.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ETCD_TOOLS = ("etcd", "etcdctl")
_labs = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root (network namespaces, TAPs, bridges); skipped otherwise")
    config.addinivalue_line("markers", "etcd: runs a real etcd; skipped unless etcd and etcdctl are installed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    not_root = pytest.mark.skip(reason="needs root (network namespaces): run as root, e.g. scripts/test")
    no_etcd = pytest.mark.skip(reason="needs etcd: apt-get install etcd-server etcd-client (scripts/setup does)")
    have_etcd = all(shutil.which(tool) for tool in ETCD_TOOLS)
    for item in items:
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(not_root)
        if "etcd" in item.keywords and not have_etcd:
            item.add_marker(no_etcd)


LabFactory = Callable[..., Any]


@pytest.fixture
def lab() -> Iterator[LabFactory]:
    """``lab(hosts=3, etcd=False, prefix="t")`` -> a built Lab (with ``lab.etcd``, a real etcd in
    its service host, when asked); everything it made is removed after the test."""
    from overlay.lab import Lab
    from overlay.lab import etcd as etcdlab

    with ExitStack() as stack:

        def make(hosts: int = 3, etcd: bool = False, prefix: str = "t") -> Any:
            built = stack.enter_context(Lab(f"{prefix}{os.getpid() % 100000}x{next(_labs)}", hosts=hosts))
            built.etcd = stack.enter_context(etcdlab.single(built)) if etcd else None
            return built

        yield make
