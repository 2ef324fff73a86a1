"""Which expert node runs what: routed experts, shared experts, dense MLPs.

Routed experts of every MoE layer are split into contiguous shards, one per expert node
(node j holds experts [j*E/N, (j+1)*E/N)). The shared expert and the dense MLP of layer l
live on node l % N, spreading that work over the nodes layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afkv.model.spec import ModelSpec


@dataclass(frozen=True)
class ExpertPlacement:
    num_nodes: int
    expert_node: torch.Tensor  # [L, E_max] int64: node of each routed expert (-1 where the layer has fewer)
    dense_node: tuple[int, ...]  # per layer: node holding the dense MLP / shared expert
    has_router: tuple[bool, ...]  # per layer: routed experts exist (else a dense MLP)
    has_shared: tuple[bool, ...]  # per layer: a shared expert sees every token

    def experts_of(self, node: int) -> frozenset[int]:
        """Logical expert ids that `node` holds (the same in every layer for contiguous shards)."""
        layer = next((i for i, r in enumerate(self.has_router) if r), None)
        if layer is None:
            return frozenset()
        return frozenset(int(e) for e in (self.expert_node[layer] == node).nonzero().flatten())

    def dense_layers_of(self, node: int) -> frozenset[int]:
        return frozenset(i for i, n in enumerate(self.dense_node) if n == node)

    def destinations(self, layer: int, topk_ids: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """-> [(node, row indices or None for all rows)] for a micro-batch of layer `layer`.

        topk_ids [T, k]: a token goes to each node hosting one of its experts; with a
        shared expert or a dense MLP, every token also goes to that layer's dense node."""
        if not self.has_router[layer]:
            return [(self.dense_node[layer], None)]
        nodes = self.expert_node[layer].to(topk_ids.device)[topk_ids]  # [T, k]
        out = []
        for node in range(self.num_nodes):
            if self.has_shared[layer] and node == self.dense_node[layer]:
                out.append((node, None))
                continue
            rows = (nodes == node).any(-1).nonzero().flatten()  # [n]
            if rows.numel():
                out.append((node, rows))
        return out


def contiguous_placement(spec: ModelSpec, num_nodes: int) -> ExpertPlacement:
    num_layers = spec.num_layers
    widths = [spec.num_routed_experts(i) if spec.layer_has_router(i) else 0 for i in range(num_layers)]
    e_max = max(widths + [1])
    table = torch.full((num_layers, e_max), -1, dtype=torch.int64)
    for i, e in enumerate(widths):
        if e:
            table[i, :e] = torch.arange(e) * num_nodes // e
    return ExpertPlacement(
        num_nodes=num_nodes,
        expert_node=table,
        dense_node=tuple(i % num_nodes for i in range(num_layers)),
        has_router=tuple(w > 0 for w in widths),
        has_shared=tuple(spec.sparse_layers[i] and spec.shared_expert_intermediate_size > 0 for i in range(num_layers)),
    )
