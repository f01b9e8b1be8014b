"""Cluster mode is an optional extra: the default path (the command line, `serve`'s settings,
the app and its routes) never imports `ray` or `redis`, installed or not."""

from __future__ import annotations

from tests.unit.test_worker_imports import heavy, modules_after

CLUSTER_ONLY = ("ray", "redis")


def test_the_server_imports_neither_ray_nor_redis() -> None:
    modules = modules_after(
        "from pensieve.cli.main import build_parser\n"
        "build_parser().parse_args(['serve', '--port', '8081'])\n"
        "import pensieve.cli.serve\n"
        "from pensieve.api.app import create_app\n"
        "from pensieve.runtime import ModelRuntime\n"
        "create_app(ModelRuntime())\n"
        "import pensieve.cluster.routing\n")
    assert {"pensieve.api.app", "pensieve.cli.serve", "pensieve.cluster.routing"} <= modules
    assert heavy(modules, CLUSTER_ONLY) == []
