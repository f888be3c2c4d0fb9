"""KV storage: block geometry, tiers (device / host / disk) and placement. Knows nothing of
attention or the engine (lower layer: imports only config and kernels)."""
