"""Native CPU kernels, compiled on first use (a leaf package: imports nothing from kvoffload)."""
