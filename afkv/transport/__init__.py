"""Transports between the nodes of a deployment.

Layer map (modules import only downwards; afkv.errors below all):
    control   control plane: msgpack frames over asyncio streams
              (registration, heartbeats, step metadata, placement updates,
              shutdown); ControlServer, ControlClient, read_frame/write_frame
"""
