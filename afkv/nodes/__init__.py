"""A deployment's nodes: the attention node's side (links, data plane) and the expert nodes.

    placement.py     ExpertPlacement: which expert node holds which expert (immutable, epochs)
    dispatch.py      the routing rule: which node computes which row (device tables), capacities
    links.py         ExpertLinks: the attention node's links to the expert nodes (requests,
                     liveness, rejoin, placement epochs)
    remote_ffn.py    RemoteFFN: the attention node's FFN backend, the fixed-buffer data plane
    attention.py     connect_expert_nodes: rendezvous -> ExpertLinks -> RemoteFFN
    balancer.py      Balancer: load statistics and live rebalancing (EPLB coordinator)
    rendezvous.py    the authenticated key-value store nodes meet through
    transfer.py      expert weights between expert nodes (control-plane frames, NCCL)
    expert_stats.py  ExpertStats: an expert node's counters, one owner
    holdings.py      Holdings: an expert node's placements, experts and FFN side; EPLB changes
    expert_plane.py  ExpertPlane: an expert node's side of the data plane, a link per attention node;
                     steps run alone or merged into one FFN call per layer over every attention node
    expert.py        ExpertNode: the control server and its table of handlers
    handoff.py       prefill/decode disaggregation: the KV hand-off protocol and checks, and
                     PrefillLinks, a decode node's links to the prefill nodes (routing, retries)

Layer map (a module imports only modules to its left):

    attention side   placement <- dispatch, links <- remote_ffn <- attention (and rendezvous)
                     placement, links <- balancer
    expert side      placement, transfer, expert_stats <- holdings <- expert_plane <- expert
    prefill side     rendezvous <- handoff (the prefill node's server is afkv.serve.prefill)
    rendezvous and transfer import no other module of afkv.nodes; the two sides meet only
    in placement (and on the wire).

Reads afkv.config, afkv.model, afkv.kv (handoff), afkv.transport, afkv.eplb and afkv.errors; the engine and the
serve layer sit above it. A change goes to one room: who computes a row -> dispatch.py; a lost
or returning expert node -> links.py; buffers, peers and step faults -> remote_ffn.py (attention)
or expert_plane.py (expert); what an expert node holds -> holdings.py; KV blocks between a
prefill and a decode node -> handoff.py.
"""
