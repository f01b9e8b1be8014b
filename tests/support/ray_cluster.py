"""A real Ray cluster of several nodes on this machine, for the cluster tests: each node a
separate `ray start` (its own raylet), all under one temp dir of the test's own, on free
loopback ports; stopped by PID (never `ray stop`, which would stop every Ray on the box)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.server import free_ports

ROOT = Path(__file__).resolve().parents[2]
OBJECT_STORE_BYTES = 256 << 20  # per node; step messages are small
# Every node on loopback. Not 127.0.0.1: Ray swaps "localhost" addresses for the machine's
# network address (so other machines could reach it); any other 127.x address it keeps.
NODE_IP = "127.0.0.2"


@dataclass
class RayCluster:
    address: str  # host:port of the head's GCS, as `ray start --head` prints it
    temp_dir: Path
    env: dict[str, str]
    known_pids: set[int] = field(default_factory=set)  # every process seen that is ours

    def processes(self) -> set[int]:
        """Our Ray processes (their command lines name our temp dir) and all below them
        (workers, replicas, the replicas' model workers)."""
        roots = {pid for pid, cmd in _cmdlines().items() if str(self.temp_dir) in cmd}
        found = roots | _descendants(roots)
        self.known_pids |= found
        return found

    def alive(self) -> set[int]:
        return {pid for pid in self.known_pids | self.processes() if is_alive(pid)}


def cluster_env() -> dict[str, str]:
    """What Ray's processes need to import this checkout's Pensieve (replicas run it)."""
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1"}


def start_ray_cluster(num_nodes: int = 2, cpus_per_node: int = 1) -> RayCluster:
    # Ray's socket paths live under the temp dir and must stay short (AF_UNIX: 107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="pray-", dir="/tmp"))
    env = cluster_env()
    # every port of every node chosen at once, so no two components are given the same one
    ports = iter(free_ports(2 + len(_NODE_PORT_FLAGS) * num_nodes))
    port = next(ports)
    cluster = RayCluster(f"{NODE_IP}:{port}", temp_dir, env)
    try:
        _ray_start(env, "--head", "--port", str(port), "--node-ip-address", NODE_IP,
                   "--num-cpus", str(cpus_per_node), "--temp-dir", str(temp_dir),
                   "--include-dashboard=false", "--disable-usage-stats",
                   "--ray-client-server-port", str(next(ports)), *_node_ports(ports))
        for _ in range(num_nodes - 1):
            _ray_start(env, "--address", cluster.address, "--node-ip-address", NODE_IP,
                       "--num-cpus", str(cpus_per_node), *_node_ports(ports))
    except BaseException:
        cluster.processes()
        stop_ray_cluster(cluster)
        raise
    cluster.processes()
    return cluster


def stop_ray_cluster(cluster: RayCluster, timeout: float = 30.0) -> set[int]:
    """SIGTERM every process of ours, SIGKILL what is left; returns the pids still alive.
    Once none is, the temp dir (sessions, logs) goes too."""
    left = _stop(cluster, timeout)
    if not left:
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return left


def _stop(cluster: RayCluster, timeout: float) -> set[int]:
    pids = cluster.alive()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout / 2
        while time.monotonic() < deadline:
            pids = cluster.alive()
            if not pids:
                return set()
            time.sleep(0.2)
    return cluster.alive()


def _ray_start(env: dict[str, str], *args: str) -> None:
    ray = str(Path(sys.executable).parent / "ray")
    out = subprocess.run([ray, "start", *args], env=env, capture_output=True, text=True,
                         timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")


_NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port",
                    "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                    "--metrics-export-port", "--runtime-env-agent-port")


def _node_ports(ports: Iterator[int]) -> list[str]:
    """Each node's own agent and manager ports: two raylets on one machine cannot share."""
    return ["--object-store-memory", str(OBJECT_STORE_BYTES),
            *(arg for flag in _NODE_PORT_FLAGS for arg in (flag, str(next(ports))))]


def _cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
    return out


def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent has yet to reap it
