"""Transports between the processes of a deployment.

    control   control plane: msgpack frames over asyncio streams (handshake, requests,
              heartbeats, step metadata, placement updates); ControlServer, ControlClient
    tensors   tensors as raw bytes inside control frames (placements, expert weights)
    streams   a device's streams and events: CUDA's, or host stand-ins with the same calls
    nccl      NcclPeer: NCCL point-to-point between two GPUs (CuPy's library, through ctypes)
    host      HostPeer: the same calls over a TCP connection through host memory
    peer      the Peer protocol of the data plane and the one rule choosing NCCL or host

Layer map: control, tensors, streams, nccl, host <- peer. Reads only afkv.errors.
"""
