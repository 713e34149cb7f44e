"""Deploy: export bundles, the openpi-protocol policy server, and the fixed-rate controller loop."""
