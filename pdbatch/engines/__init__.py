"""The engines: the seam the driver talks to (one Engine per worker) and the engines behind it."""
