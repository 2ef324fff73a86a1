"""`afkv plan`: a calibrated per-layer latency model that chooses the deployment."""
