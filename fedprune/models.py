"""Generic access to Hugging Face causal LMs: loading, decoder blocks, prunable linear layers.

No per-architecture code: decoder blocks are found through the model's ``_no_split_modules``, prunable
layers by type (``nn.Linear`` and GPT-2's transposed ``Conv1D``). Embeddings and ``lm_head`` live outside
the blocks and are therefore never pruned.
"""

from __future__ import annotations

import logging
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


def find_prunable_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Prunable linear layers of one block, by name relative to the block, in execution-agnostic order."""
    return {name: m for name, m in block.named_modules() if name and is_prunable(m)}


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


def layer_input_features(module: nn.Module) -> int:
    """Number of input features of a prunable layer."""
    return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]


def prunable_parameter_count(model: nn.Module) -> int:
    """Number of weights in all prunable layers of all decoder blocks."""
    _, blocks = find_blocks(model)
    return sum(m.weight.numel() for b in blocks for m in find_prunable_layers(b).values())


def model_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over all prunable layers of all decoder blocks."""
    _, blocks = find_blocks(model)
    zeros = total = 0
    for block in blocks:
        for layer in find_prunable_layers(block).values():
            zeros += int((layer.weight == 0).sum())
            total += layer.weight.numel()
    return zeros / total if total else 0.0
