"""What every search space provides; the protocol a user space follows.

A supernet is an ``nn.Module`` with

* ``cell_types``: the names of its cell types (``("cell",)`` or ``("normal", "reduce")``);
* ``candidates[cell_type]``: per edge, the tuple of candidate op names (after a warm start the
  edges may keep different ops, but every edge keeps the same number);
* ``alphas``: an ``nn.ParameterDict`` of ``[n_edges, n_ops]`` logits per cell type - registered
  parameters, so checkpoints, ``.to(device)`` and DDP handle them like any weight;
* ``forward(x, weights=None)``: ``weights`` maps a cell type to one entry per edge in the forms
  ``MixedOp`` understands (softmax rows, a sampled op index, a mask, ``None``); the default is
  the softmax of the alphas;
* ``genotype()``: the derived discrete architecture; ``weights_for(genotype)``: the per-edge
  entries that make the supernet compute exactly that architecture;
* ``edge_names(cell_type)``: names such as ``"2<-1"`` for logging.

``SupernetBase`` implements the parts that are the same for every space.
"""

from __future__ import annotations

import torch
from torch import nn


class SupernetBase(nn.Module):
    cell_types: tuple[str, ...] = ()

    def _init_alphas(self, scale: float = 1e-3) -> None:
        # DARTS initialises the logits at 1e-3 * N(0, 1): near-uniform, but not exactly tied.
        self.alphas = nn.ParameterDict(
            {
                t: nn.Parameter(scale * torch.randn(len(self.candidates[t]), len(self.candidates[t][0])))
                for t in self.cell_types
            }
        )

    @staticmethod
    def _check_candidates(candidates, n_edges: int, cell_type: str):
        candidates = [tuple(c) for c in candidates]
        if len(candidates) != n_edges:
            raise ValueError(f"{cell_type} cell has {n_edges} edges, got candidates for {len(candidates)}")
        if len({len(c) for c in candidates}) != 1:
            raise ValueError(f"every {cell_type} edge must keep the same number of candidate ops")
        return candidates

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.alphas.values())

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def arch_weights(self) -> dict[str, torch.Tensor]:
        return {t: torch.softmax(a, dim=-1) for t, a in self.alphas.items()}

    def edge_names(self, cell_type: str) -> list[str]:
        return list(self._edge_names)

    def num_weight_parameters(self) -> int:
        return sum(p.numel() for p in self.weight_parameters())
