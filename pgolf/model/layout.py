"""The block matrices and parameter roles: the one table every phase reads.

Each transformer block ``blocks.{i}`` multiplies by six matrices. The model
keeps them in four banks (3-D parameters, so Muon orthogonalises them
batched); quantisation sees them unbanked under conventional 2-D names
``blocks.{i}.{module}.weight``. For each matrix :data:`BLOCK_MATRICES` gives

- ``module``: its module inside the block (a parameter-free ``BankLinear``,
  whose forward-pre-hook sees the matrix's input);
- ``bank`` and ``upper``: layer i uses slice ``[i]`` of the bank, or ``[L+i]``
  when ``upper`` (Q and O share ``qo_bank``, K and V ``kv_bank``);
- ``cls``: the quantisation class, which picks the grid's bits
  (``quantize.attn_bits`` / ``quantize.mlp_bits``, for export and late QAT);
- ``hessian``: the key of its input's second moment within the block
  (Q, K and V read one input, stored once as ``attn.qkv``);
- ``rows``/``cols``: the :class:`~pgolf.model.config.ModelConfig` fields that
  give its shape.

The order of the table is the order of the unbanked state dict within a layer.
Optimizer roles (docs/RECIPE.md §3.1): ``bank`` (Muon), ``embed`` and
``scalar`` (AdamW); :func:`pgolf.model.gpt.param_roles` assigns them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

BLOCK_PREFIX = "blocks"


@dataclass(frozen=True)
class BlockMatrix:
    module: str  # "attn.c_q": the module inside blocks.{i}
    bank: str  # the bank parameter holding it
    upper: bool  # layer i at bank slice [L+i] instead of [i]
    cls: str  # quantisation class (BLOCK_CLASSES)
    hessian: str  # Hessian key inside the block (shared by matrices that read one input)
    rows: str  # ModelConfig field: output features
    cols: str  # ModelConfig field: input features


BLOCK_MATRICES = (
    BlockMatrix("attn.c_q", "qo_bank", False, "attn", "attn.qkv", "model_dim", "model_dim"),
    BlockMatrix("attn.c_k", "kv_bank", False, "attn", "attn.qkv", "kv_dim", "model_dim"),
    BlockMatrix("attn.c_v", "kv_bank", True, "attn", "attn.qkv", "kv_dim", "model_dim"),
    BlockMatrix("attn.proj", "qo_bank", True, "attn", "attn.proj", "model_dim", "model_dim"),
    BlockMatrix("mlp.fc", "mlp_up_bank", False, "mlp", "mlp.fc", "mlp_hidden", "model_dim"),
    BlockMatrix("mlp.proj", "mlp_down_bank", False, "mlp", "mlp.proj", "model_dim", "mlp_hidden"),
)
BANK_NAMES = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
BLOCK_CLASSES = ("attn", "mlp")
# Each bank holds matrices of one class, so late QAT fake-quantises a whole bank on its class's grid.
BANK_CLASS = {m.bank: m.cls for m in BLOCK_MATRICES}

ROLE_BANK = "bank"
ROLE_EMBEDDING = "embed"
ROLE_SCALAR = "scalar"
ROLES = (ROLE_BANK, ROLE_EMBEDDING, ROLE_SCALAR)
# Token-indexed tables (and an untied output matrix): the ``embed`` role.
EMBEDDING_PARAMS = ("tok_emb.weight", "bigram.embed.weight", "value_embed.embed.weight", "lm_head.weight")

_BY_MODULE = {m.module: m for m in BLOCK_MATRICES}
_IN_BLOCK = re.compile(rf"^{BLOCK_PREFIX}\.(\d+)\.(.+)$")
_BLOCK_INDEX = re.compile(rf"(?:^|\.){BLOCK_PREFIX}\.(\d+)(?:\.|$)")


def block_module(module_name: str) -> tuple[int, BlockMatrix] | None:
    """``blocks.3.attn.c_k`` → (3, the c_k entry); None for any other module name."""
    match = _IN_BLOCK.match(module_name)
    if match is None or match.group(2) not in _BY_MODULE:
        return None
    return int(match.group(1)), _BY_MODULE[match.group(2)]


def block_weight(weight_name: str) -> tuple[int, BlockMatrix] | None:
    """``blocks.3.attn.c_k.weight`` (an unbanked name) → (3, the c_k entry); None otherwise."""
    if not weight_name.endswith(".weight"):
        return None
    return block_module(weight_name.removesuffix(".weight"))


def weight_name(layer: int, matrix: BlockMatrix) -> str:
    return f"{BLOCK_PREFIX}.{layer}.{matrix.module}.weight"


def hessian_key(layer: int, matrix: BlockMatrix) -> str:
    return f"{BLOCK_PREFIX}.{layer}.{matrix.hessian}"


def first_reader(matrix: BlockMatrix) -> BlockMatrix:
    """The first matrix of the table with ``matrix``'s Hessian key (Q for K and V; else itself)."""
    return next(m for m in BLOCK_MATRICES if m.hessian == matrix.hessian)


def shares_input(matrix: BlockMatrix) -> bool:
    """True when another matrix of the block reads the same input (Q, K, V)."""
    return sum(m.hessian == matrix.hessian for m in BLOCK_MATRICES) > 1


def block_index(name: str) -> int | None:
    """The i of the first ``blocks.{i}`` component of a module or parameter name."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def bank_layout(num_layers: int) -> dict[str, tuple[str, int]]:
    """Unbanked 2-D name → (bank, slice index), layer by layer in table order."""
    return {weight_name(i, m): (m.bank, num_layers * m.upper + i)
            for i in range(num_layers) for m in BLOCK_MATRICES}

