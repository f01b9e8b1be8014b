"""How a cluster deployment is shaped, from the settings (no Ray here: config.py builds it)."""

from __future__ import annotations

from dataclasses import dataclass

ADMIN_HEADROOM = 8  # requests a full replica still takes: status and memory calls


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """`address`: a Ray cluster as `ray start --head` prints it (host:port), `auto` (the
    cluster this machine is a node of), or a Ray Client `ray://host:port` address."""

    address: str
    num_replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: Serve autoscales between them
    max_replicas: int | None = None
    max_replicas_per_node: int | None = 1  # None: no limit
    replica_cpus: float = 1.0  # CPUs Ray reserves for each replica (its worker's threads)
    max_queue: int = 16  # a conversation's replica with more in flight is overloaded
    max_ongoing: int = 272  # requests Serve sends one replica at most

    @property
    def is_autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def autoscaling_config(self) -> dict[str, int]:
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low,
                                                                             self.num_replicas)
        return {"min_replicas": low, "max_replicas": high,
                "initial_replicas": min(max(self.num_replicas, low), high),
                "target_ongoing_requests": self.max_queue}
