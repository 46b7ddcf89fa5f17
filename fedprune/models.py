"""Generic access to Hugging Face causal LMs: loading, decoder blocks, prunable linear layers.

No per-architecture code: decoder blocks are found through the model's ``_no_split_modules``, prunable
layers by type (``nn.Linear`` and GPT-2's transposed ``Conv1D``). Embeddings and ``lm_head`` live outside
the blocks and are therefore never pruned.

Nothing inside a block is skipped silently: :func:`check_prunable` rejects any parameter of two or more
dimensions that is not the weight of a prunable layer (e.g. the fused 3-D experts ``experts.gate_up_proj``
and the router ``mlp.gate.weight`` of Mixtral / Qwen-MoE / OLMoE in transformers 5), unless an ``ignore``
pattern leaves it dense on purpose. An ``ignore`` pattern (``fnmatch``, case-sensitive) is matched against
a parameter's name and the names of the modules containing it, both relative to the block
(``"self_attn.o_proj"``, ``"mlp.*"``) and fully qualified (``"model.layers.0.mlp.down_proj"``,
``"model.layers.0"``); a prunable layer is ignored when its weight is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load an HF causal LM from a local folder, in eval mode, without any hub access."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.eval()
    model.config.use_cache = False
    return model


def load_tokenizer(path: str | Path):
    """Load the tokenizer saved beside a model folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def input_device(model: nn.Module) -> torch.device:
    """The device the model's input ids go to (its input embeddings'; decoder blocks may be on ``meta``)."""
    return model.get_input_embeddings().weight.device


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified name, ModuleList)`` of the decoder blocks of ``model``.

    The blocks are the largest ``nn.ModuleList`` whose children are all of a class named in the model's
    ``_no_split_modules`` (how HF marks its repeated transformer layers).
    """
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        names = {type(child).__name__ for child in module}
        if block_classes and not names <= block_classes:
            continue
        if not block_classes and len(names) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"cannot find decoder blocks in {type(model).__name__}: no ModuleList of "
            f"{sorted(block_classes) or 'uniform modules'}"
        )
    return best


def is_prunable(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and HF's ``Conv1D`` (GPT-2 style, weight stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _check_patterns(ignore: Sequence[str]) -> tuple[str, ...]:
    """``ignore`` as a tuple of patterns (a bare string is refused: it would iterate as characters)."""
    if isinstance(ignore, str):
        raise TypeError(f"ignore must be a sequence of patterns, not the string {ignore!r}")
    return tuple(ignore)


def _candidate_names(name: str, block_prefix: str) -> list[str]:
    """``name`` and every enclosing module name inside the block, relative and (with a prefix) qualified."""
    parts = name.split(".")
    relative = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    if not block_prefix:
        return relative
    return relative + [f"{block_prefix}.{n}" for n in relative] + [block_prefix]


def matching_patterns(name: str, ignore: Sequence[str], block_prefix: str = "") -> tuple[str, ...]:
    """The patterns of ``ignore`` that match ``name`` (a parameter or module name relative to its block)."""
    patterns = _check_patterns(ignore)
    if not patterns:
        return ()
    names = _candidate_names(name, block_prefix)
    return tuple(p for p in patterns if any(fnmatchcase(n, p) for n in names))


def is_ignored(name: str, ignore: Sequence[str], block_prefix: str = "") -> bool:
    """True if a pattern of ``ignore`` leaves ``name`` (relative to its block) dense on purpose."""
    return bool(matching_patterns(name, ignore, block_prefix))


def find_prunable_layers(
    block: nn.Module, ignore: Sequence[str] = (), block_prefix: str = ""
) -> dict[str, nn.Module]:
    """Prunable linear layers of one block, by name relative to the block, in module order.

    Layers whose weight matches an ``ignore`` pattern are left out; ``block_prefix`` (e.g.
    ``"model.layers.0"``) lets qualified patterns match too.
    """
    return {
        name: m
        for name, m in block.named_modules()
        if name and is_prunable(m) and not is_ignored(f"{name}.weight", ignore, block_prefix)
    }


def named_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, block)`` of every decoder block, e.g. ``("model.layers.0", block)``."""
    blocks_name, blocks = find_blocks(model)
    return [(f"{blocks_name}.{index}", block) for index, block in enumerate(blocks)]


class UnprunableParameterError(ValueError):
    """A decoder block holds weights the pruners cannot prune and no ``ignore`` pattern covers."""

    def __init__(self, message: str, names: Sequence[str]):
        super().__init__(message)
        self.names = tuple(names)


class IgnorePatternError(ValueError):
    """An ``ignore`` pattern matches no parameter inside the decoder blocks (most likely a typo)."""

    def __init__(self, message: str, patterns: Sequence[str]):
        super().__init__(message)
        self.patterns = tuple(patterns)


def _layer_weight_ids(block: nn.Module) -> set[int]:
    return {id(m.weight) for m in find_prunable_layers(block).values()}


MAX_LISTED = 20  # parameters named in an UnprunableParameterError message


def check_prunable(model: nn.Module, ignore: Sequence[str] = ()) -> None:
    """Refuse to prune a model of which some block weights would silently stay dense.

    Every parameter inside the decoder blocks must be the weight of a prunable layer, 1-D (norm weights,
    biases), or matched by an ``ignore`` pattern; otherwise :class:`UnprunableParameterError` names them
    with their shapes. An ``ignore`` pattern that matches no parameter raises :class:`IgnorePatternError`.
    """
    patterns = _check_patterns(ignore)
    used: set[str] = set()
    bad: list[tuple[str, str, tuple[int, ...]]] = []  # (qualified name, relative name, shape)
    for prefix, block in named_blocks(model):
        weights = _layer_weight_ids(block)
        for name, param in block.named_parameters():
            hits = matching_patterns(name, patterns, prefix)
            used.update(hits)
            if not hits and param.dim() > 1 and id(param) not in weights:
                bad.append((f"{prefix}.{name}", name, tuple(param.shape)))
    unused = [p for p in patterns if p not in used]
    if unused:
        raise IgnorePatternError(
            f"ignore pattern(s) {unused} match no parameter inside the decoder blocks of "
            f"{type(model).__name__} (patterns match names relative to a block, e.g. 'self_attn.o_proj', "
            "or qualified, e.g. 'model.layers.0.mlp.*')",
            unused,
        )
    if bad:
        listed = "\n".join(f"  {full} {shape}" for full, _, shape in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        suggestion = tuple(dict.fromkeys(rel for _, rel, _ in bad))
        raise UnprunableParameterError(
            f"{len(bad)} parameter(s) inside the decoder blocks of {type(model).__name__} are neither the "
            "weight of a prunable layer (nn.Linear, Conv1D) nor 1-D, so they would stay dense while the "
            f"reported sparsity leaves them out:\n{listed}{more}\n"
            f"To leave them dense on purpose, add them to `ignore`, e.g. ignore={suggestion!r}.",
            [full for full, _, _ in bad],
        )


def is_transposed(module: nn.Module) -> bool:
    """True when the layer stores its weight as ``(in_features, out_features)`` (HF ``Conv1D``)."""
    return type(module).__name__ == "Conv1D"


def get_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a detached ``(out_features, in_features)`` tensor (a copy for Conv1D)."""
    weight = module.weight.detach()
    return weight.t().contiguous() if is_transposed(module) else weight.clone()


def set_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``(out_features, in_features)`` weight into the layer in place."""
    target = module.weight
    value = weight.t() if is_transposed(module) else weight
    if value.shape != target.shape:
        raise ValueError(f"weight shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


def apply_weights_(block: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Write ``(out, in)`` weights into the named prunable layers of ``block``."""
    layers = find_prunable_layers(block)
    for name, weight in weights.items():
        set_weight_(layers[name], weight)


def layer_input_features(module: nn.Module) -> int:
    """Number of input features of a prunable layer."""
    return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]


def prunable_parameter_count(model: nn.Module, ignore: Sequence[str] = ()) -> int:
    """Number of weights in all prunable, not ignored layers of all decoder blocks."""
    return sum(
        m.weight.numel()
        for prefix, block in named_blocks(model)
        for m in find_prunable_layers(block, ignore, prefix).values()
    )


@dataclass(frozen=True)
class SparsityReport:
    """What a sparsity figure covers, over the parameters inside the decoder blocks.

    ``sparsity`` is ``zeros / pruned_weights`` over the prunable, not ignored layers. ``ignored`` and
    ``unprunable`` map qualified parameter names (tensors of 2 or more dims) to their sizes: left dense by
    an ``ignore`` pattern, and left dense although nothing asked for it (what :func:`check_prunable`
    rejects). ``coverage`` is ``pruned_weights / block_parameters`` (1-D parameters count in the total).
    """

    sparsity: float
    zeros: int
    pruned_weights: int
    ignored: dict[str, int]
    ignored_weights: int
    unprunable: dict[str, int]
    block_parameters: int
    coverage: float


def sparsity_report(
    model: nn.Module, ignore: Sequence[str] = (), blocks: Iterable[tuple[str, nn.Module]] | None = None
) -> SparsityReport:
    """Fraction of exactly-zero weights over the pruned layers, and what it covers and leaves out.

    ``blocks``: ``(qualified name, block)`` pairs to count instead of the model's own (an offloaded
    model's blocks, materialised one at a time)."""
    patterns = _check_patterns(ignore)
    zeros = total = block_parameters = 0
    ignored: dict[str, int] = {}
    unprunable: dict[str, int] = {}
    for prefix, block in named_blocks(model) if blocks is None else blocks:
        layers = find_prunable_layers(block, patterns, prefix)
        for layer in layers.values():
            zeros += int((layer.weight == 0).sum())
            total += layer.weight.numel()
        kept, weights = {id(m.weight) for m in layers.values()}, _layer_weight_ids(block)
        for name, param in block.named_parameters():
            block_parameters += param.numel()
            if id(param) in kept or param.dim() <= 1:
                continue
            if id(param) in weights or is_ignored(name, patterns, prefix):
                ignored[f"{prefix}.{name}"] = param.numel()
            else:
                unprunable[f"{prefix}.{name}"] = param.numel()
    return SparsityReport(
        sparsity=zeros / total if total else 0.0,
        zeros=zeros,
        pruned_weights=total,
        ignored=ignored,
        ignored_weights=sum(ignored.values()),
        unprunable=unprunable,
        block_parameters=block_parameters,
        coverage=total / block_parameters if block_parameters else 0.0,
    )


def model_sparsity(model: nn.Module, ignore: Sequence[str] = ()) -> float:
    """Fraction of exactly-zero weights over all prunable, not ignored layers of all decoder blocks
    (what it covers: :func:`sparsity_report`)."""
    return sparsity_report(model, ignore).sparsity
