"""A structurally pruned model on disk: its config updated to the new widths where the family's config can
state them, and ``fedprune_structure.json`` with every decoder-block layer's shape, so that
:func:`load_pruned` loads it whatever the config can express.

With the same widths in every block (and biases only where the family's config can add them) the
folder loads with plain ``AutoModelForCausalLM.from_pretrained``; :func:`finalize_config_` says whether it
does, by building the model of the updated config on the ``meta`` device and comparing every tensor shape.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from fedprune.edits import STRUCTURE_ATTRIBUTES, replace_module_, with_bias
from fedprune.models import find_prunable_layers, get_weight, is_transposed, named_blocks
from fedprune.structured.depth import ZeroAttention
from fedprune.structured.families import Family, Geometry

logger = logging.getLogger(__name__)

STRUCTURE_FILE = "fedprune_structure.json"
NOT_FROM_PRETRAINED = (
    "(structurally pruned with widths its config cannot state: load with fedprune.load_pruned)"
)


def attention_removed(block: nn.Module, family: Family) -> bool:
    """True if the block's attention sublayer was removed (:class:`ZeroAttention`)."""
    return isinstance(block.get_submodule(family.attention), ZeroAttention)


def _widths(model: nn.Module, family: Family, shape: Geometry) -> tuple[list[int], list[int]]:
    """Per block, the FFN width and the number of key/value groups (from the consumers' inputs; blocks
    without attention are left out of the groups)."""
    ffn, groups = [], []
    for _, block in named_blocks(model):
        layers = find_prunable_layers(block)
        ffn.append(int(get_weight(layers[family.ffn_consumer]).shape[1]))
        if not attention_removed(block, family):
            width = int(get_weight(layers[family.attn_consumer]).shape[1])
            groups.append(width // (shape.heads_per_group * shape.head_dim))
    return ffn, groups


def realised_fractions(model: nn.Module, family: Family, shape: Geometry) -> dict[str, float]:
    """The fractions of FFN neurons and of query heads removed over all blocks, as the model is now."""
    ffn, groups = _widths(model, family, shape)
    return {
        "ffn_removed": 1.0 - sum(ffn) / (shape.ffn * len(ffn)),
        "heads_removed": 1.0 - sum(groups) / (shape.kv_groups * len(groups)) if groups else 1.0,
        "attention_removed": len(ffn) - len(groups),
    }


def _add_zero_biases_(model: nn.Module, names: tuple[str, ...]) -> None:
    """Give every block's layers ``names`` a bias (zeros) where they have none."""
    for _, block in named_blocks(model):
        layers = find_prunable_layers(block)
        for name in names:
            layer = layers[name]
            if getattr(layer, "bias", None) is None:
                zeros = torch.zeros(get_weight(layer).shape[0], dtype=layer.weight.dtype)
                replace_module_(block, name, with_bias(layer, zeros))


def _has_bias(model: nn.Module, names: tuple[str, ...]) -> bool:
    return any(
        getattr(find_prunable_layers(block)[name], "bias", None) is not None
        for _, block in named_blocks(model)
        for name in names
    )


def _expected_shapes(config: object) -> dict[str, tuple[int, ...]]:
    """Every tensor shape of the model ``config`` describes (built on ``meta``: no memory, no init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in reference.state_dict().items()}


def finalize_config_(model: nn.Module, family: Family, shape: Geometry) -> bool:
    """Write the pruned widths into ``model.config`` where they are the same in every block, add zero
    biases where a config flag (Llama's ``mlp_bias`` / ``attention_bias``) must then be set; True if
    ``from_pretrained`` builds exactly the model's tensor shapes from the updated config."""
    config = model.config
    ffn, groups = _widths(model, family, shape)
    if len(set(ffn)) == 1 and ffn[0] != shape.ffn:
        setattr(config, family.ffn_key, ffn[0])
    heads_changed = any(g != shape.kv_groups for g in groups)
    if heads_changed and family.heads_in_config and len(set(groups)) == 1:
        setattr(config, family.heads_key, groups[0] * shape.heads_per_group)
        setattr(config, family.kv_heads_key, groups[0])
        config.head_dim = shape.head_dim  # explicit: the default hidden // heads would change it
    ffn_layers = (*family.ffn_producers, family.ffn_consumer)
    attention_layers = (family.query, *family.keys_values, family.attn_consumer)
    parts = [("mlp", ffn_layers)]
    if not any(attention_removed(block, family) for _, block in named_blocks(model)):
        parts.append(("attention", attention_layers))
    for part, names in parts:
        key = family.bias_keys.get(part, "")
        if key and hasattr(config, key) and not getattr(config, key) and _has_bias(model, names):
            setattr(config, key, True)  # every layer of that part then has a bias
            _add_zero_biases_(model, names)
    actual = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected = _expected_shapes(config)
    loadable = actual == expected
    if not loadable:
        differ = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
        logger.info(
            "the pruned model's config cannot state its shapes (%d tensors differ, e.g. %s): load it with "
            "fedprune.load_pruned",
            len(differ),
            differ[:3],
        )
    return loadable


def config_updates(model: nn.Module, loadable: bool) -> dict[str, str]:
    """Changes to the saved ``config.json``: where ``from_pretrained`` would build other shapes (and then
    silently drop or randomly initialise tensors), a ``model_type`` it refuses, naming the loader;
    :func:`load_pruned` restores the real one from the structure file."""
    if loadable:
        return {}
    return {"model_type": f"{model.config.model_type} {NOT_FROM_PRETRAINED}"}


def structure_record(model: nn.Module, loadable: bool) -> dict:
    """What :func:`load_pruned` needs: every block layer's ``[out, in, has bias]`` and the attention
    modules' head attributes, by qualified name."""
    layers, attributes, no_attention = {}, {}, []
    for prefix, block in named_blocks(model):
        for name, module in block.named_modules():
            if isinstance(module, ZeroAttention):
                no_attention.append(f"{prefix}.{name}")
        for name, layer in find_prunable_layers(block).items():
            out, inp = get_weight(layer).shape
            layers[f"{prefix}.{name}"] = [int(out), int(inp), getattr(layer, "bias", None) is not None]
        for name, module in block.named_modules():
            for attribute in STRUCTURE_ATTRIBUTES:
                if isinstance(getattr(module, attribute, None), int) and name:
                    attributes[f"{prefix}.{name}.{attribute}"] = int(getattr(module, attribute))
    return {
        "format": 1,
        "model_type": model.config.model_type,
        "loads_with_from_pretrained": loadable,
        "layers": layers,
        "attributes": attributes,
        "attention_removed": no_attention,
    }


def _resized(module: nn.Module, out: int, inp: int, bias: bool) -> nn.Module:
    """An uninitialised layer of the same kind as ``module`` with the given shape and bias."""
    if is_transposed(module):
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(out, inp)
        return layer.to(dtype=module.weight.dtype)
    return nn.Linear(inp, out, bias=bias, dtype=module.weight.dtype)


def _state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(path / name)))
        return state
    return load_file(str(path / "model.safetensors"))


def load_pruned(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a model fedprune saved, whatever its per-block widths (eval mode; no hub access).

    Without ``fedprune_structure.json``, or when it says the config states every shape, this is
    ``AutoModelForCausalLM.from_pretrained``. Otherwise the model is built from its config, every block layer is resized to its recorded shape (and bias), the
    attention modules get their recorded head attributes, and the saved tensors are loaded strictly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    record_path = path / STRUCTURE_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"format": 1}
    if record.get("format") != 1:
        raise ValueError(f"{record_path}: unknown format {record.get('format')!r}")
    if record.get("loads_with_from_pretrained", True):  # its config states every shape: no second copy
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        return model.eval()
    values = json.loads((path / "config.json").read_text())
    values["model_type"] = record["model_type"]
    config = AutoConfig.for_model(**values)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in record.get("attention_removed", []):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, ZeroAttention(getattr(getattr(owner, child), "layer_idx", None)))
    for name, (out, inp, bias) in record["layers"].items():
        module = model.get_submodule(name)
        if (
            tuple(get_weight(module).shape) != (out, inp)
            or (getattr(module, "bias", None) is not None) != bias
        ):
            replace_module_(model, name, _resized(module, out, inp, bias))
    for key, value in record["attributes"].items():
        module, _, attribute = key.rpartition(".")
        if attribute not in STRUCTURE_ATTRIBUTES:
            raise ValueError(f"{record_path}: attribute {key!r} not allowed")
        setattr(model.get_submodule(module), attribute, int(value))
    state = _state_dict_of(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{path}: tensors missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}"
        )
    if tied:
        model.tie_weights()
    return model.to(dtype).eval()
