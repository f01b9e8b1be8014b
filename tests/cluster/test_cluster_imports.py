"""The import check of tests/unit/test_cluster_imports.py can fail: where cluster mode is used,
it sees ray (here the cluster extra is installed)."""

from __future__ import annotations

from tests.unit.test_worker_imports import heavy, modules_after


def test_the_check_sees_ray_where_cluster_mode_imports_it() -> None:
    modules = modules_after("import pensieve.cluster.router")
    assert heavy(modules, ("ray",)) != []
