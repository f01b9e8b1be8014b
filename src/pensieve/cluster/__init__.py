"""Cluster mode (`pensieve serve --cluster ADDRESS`): the model's engines run as Ray Serve
replicas and Pensieve's own FastAPI app stays the ingress. Ray is imported only by the modules
that need it (`backend`, `deployment`, `replica`, `router`), and only when cluster mode starts:
`routing` is pure logic, and nothing on the default path imports this package's Ray parts."""
