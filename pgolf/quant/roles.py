"""The role groups of the grouped layout (docs/FRONTIER.md §4.6), from pgolf/model/layout.py.

``tok_emb`` and one group per block matrix (c_q, c_k, c_v, attn.proj, mlp.fc,
mlp.proj), each concatenated over layers. In ``SORTED_ROLES`` (F1855's
choice) each matrix's rows are stored in greedy L1 order
(pgolf/quant/compression.py). The artifact format itself knows nothing of the
model: the writer is handed :func:`role_grouping`, and the file's layout names
every member, so the reader needs no roles.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pgolf.model.layout import BLOCK_MATRICES, block_weight

if TYPE_CHECKING:
    from pgolf.quant.grouped import Grouping

EMBED_ROLE = "tok_emb"
EMBED_NAME = "tok_emb.weight"
GROUP_ROLES = (EMBED_ROLE,) + tuple(m.module for m in BLOCK_MATRICES)
# F1855 sorts the rows of tok_emb, Q (the lower slice of qo_bank) and the MLP up-projection.
_SORTED_SLICES = {("qo_bank", False), ("mlp_up_bank", False)}
SORTED_ROLES = (EMBED_ROLE,) + tuple(m.module for m in BLOCK_MATRICES if (m.bank, m.upper) in _SORTED_SLICES)


def role_of(name: str) -> str | None:
    """The group of a state-dict name: ``tok_emb``, a block matrix's module, or None."""
    if name == EMBED_NAME:
        return EMBED_ROLE
    found = block_weight(name)
    return found[1].module if found is not None else None


def role_grouping() -> Grouping:
    """The grouped layout's groups (imported only then: an optional module of the bundle, pgolf/submission/optional.py)."""
    from pgolf.quant.grouped import Grouping
    return Grouping(role_of, GROUP_ROLES, SORTED_ROLES)
