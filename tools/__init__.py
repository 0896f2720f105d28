"""Command-line tools behind the Makefile that are not pipeline stages (params, remote)."""
