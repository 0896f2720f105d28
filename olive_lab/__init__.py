"""olive_lab: the reusable code behind the pipeline, the chat engine's helpers and the benches.

Nothing here reads params.yaml, argv or fixed output paths: callers pass them in (stages/ and tools/ wire
params -> library -> outputs; olive_lab.paths is the one place that names the repository's files).
"""
