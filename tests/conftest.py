"""The default suite leaves out tests/cluster: they need the cluster extra (ray, redis) and a
redis-server. `make test-cluster` (pytest tests/cluster) runs them."""

collect_ignore = ["cluster"]
