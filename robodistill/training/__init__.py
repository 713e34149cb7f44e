"""Training pipelines: one module per command, each readable top to bottom."""
