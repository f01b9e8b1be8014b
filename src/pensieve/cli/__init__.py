"""The command line (`pensieve ...`): `main` parses and dispatches, one module per command, and
`http` is the one client every command uses to talk to a running server.

Kept empty: `python -m pensieve.cli` imports this package before its `__main__`."""
