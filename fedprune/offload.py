"""Block-by-block loading (``model.offload=true``): decoder blocks stay on disk and are materialised one at a
time, so peak memory no longer grows with depth.

- :func:`load_offloaded` builds a causal LM whose parameters are on the ``meta`` device (buffers such as
  rotary frequencies are computed as usual), then loads only the tensors outside the decoder blocks
  (embeddings, final norm, ``lm_head``; tied embeddings re-tied) from the folder's safetensors, one file
  or shards with ``model.safetensors.index.json`` (:class:`TensorSource`).
- :func:`materialize_block_` fills block i with a private copy of its tensors (in the model dtype), read
  through ``safetensors.safe_open`` (memory-mapped; each tensor's pages are unmapped right after its copy);
  :func:`release_block_` puts it back on ``meta``. :class:`OffloadedBlocks` is the driver's
  :class:`~fedprune.sequential.BlockAccess` over them, optionally writing each block to a
  :class:`BlockSaver` before releasing it.
- :class:`BlockSaver` writes a normal HF folder block by block (one shard per block, one for the rest,
  the index, config, generation config, tokenizer) into a temporary folder, renamed into place on
  :meth:`BlockSaver.commit`; ``AutoModelForCausalLM.from_pretrained`` loads it.
- :func:`offloaded_perplexity`: held-out perplexity with one block materialised at a time; the model's own
  final norm and head run in its forward, with stand-in block forwards.

Checkpoint tensor names must be the model's own parameter names (as ``save_pretrained`` writes them).
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from fedprune.eval import Perplexity, perplexity_of
from fedprune.models import find_blocks
from fedprune.sequential import (
    BlockInputs,
    capture_block_inputs,
    micro_batches,
    replaced_forwards,
    run_block,
)

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSource:
    """Which safetensors file of a model folder holds each tensor (checkpoint name -> file)."""

    files: dict[str, Path]

    @classmethod
    def of_folder(cls, folder: str | Path) -> TensorSource:
        """The tensors of an HF folder: its ``model.safetensors.index.json``, else ``model.safetensors``."""
        from safetensors import safe_open

        folder = Path(folder)
        if (folder / INDEX_FILE).is_file():
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
            return cls({name: folder / file for name, file in weight_map.items()})
        if not (folder / SINGLE_FILE).is_file():
            raise FileNotFoundError(
                f"model.offload needs safetensors weights: no {SINGLE_FILE} or {INDEX_FILE} in {folder}"
            )
        with safe_open(folder / SINGLE_FILE, framework="pt") as handle:
            return cls({name: folder / SINGLE_FILE for name in handle.keys()})

    def read(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A private copy of tensor ``name``, checked against ``like``'s shape, in its dtype if floating."""
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not in the checkpoint")
        with safe_open(self.files[name], framework="pt") as handle:
            mapped = handle.get_tensor(name)  # backed by the file's pages until copied
            if tuple(mapped.shape) != tuple(like.shape):
                raise ValueError(
                    f"tensor {name!r}: checkpoint shape {tuple(mapped.shape)}, model {tuple(like.shape)}"
                )
            dtype = like.dtype if mapped.is_floating_point() else mapped.dtype
            return mapped.to(dtype=dtype, copy=True).contiguous()


def _slots(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """``(qualified name, owner, attribute, tensor, is_parameter)`` of every parameter and persistent buffer
    of ``module`` and its submodules (parameters shared by two modules are listed under each)."""
    for name, owner in module.named_modules(remove_duplicate=False):
        base = f"{prefix}.{name}" if prefix and name else prefix or name
        for attr, param in owner._parameters.items():
            if param is not None:
                yield (f"{base}.{attr}" if base else attr), owner, attr, param, True
        for attr, buffer in owner._buffers.items():
            if buffer is not None and attr not in owner._non_persistent_buffers_set:
                yield (f"{base}.{attr}" if base else attr), owner, attr, buffer, False


def _set_(owner: nn.Module, attr: str, value: torch.Tensor, old: torch.Tensor, is_param: bool) -> None:
    """Replace ``owner.<attr>`` by ``value`` (a parameter keeps ``requires_grad``)."""
    if is_param:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = value


def _block(model: nn.Module, index: int) -> tuple[str, nn.Module]:
    blocks_name, blocks = find_blocks(model)
    return f"{blocks_name}.{index}", blocks[index]


def _fill_(module: nn.Module, source: TensorSource, prefix: str) -> nn.Module:
    """Every parameter (and persistent buffer) of ``module`` read from ``source`` under ``prefix``."""
    for name, owner, attr, tensor, is_param in _slots(module, prefix):
        _set_(owner, attr, source.read(name, tensor), tensor, is_param)
    return module


def materialize_block_(model: nn.Module, source: TensorSource, index: int) -> nn.Module:
    """Load block ``index`` of ``model`` from ``source`` (a private copy, model dtype); return the block."""
    prefix, block = _block(model, index)
    return _fill_(block, source, prefix)


def release_block_(model: nn.Module, index: int) -> None:
    """Put the parameters of block ``index`` back on the ``meta`` device (shape and dtype kept), and hand
    freed heap memory back to the system (:func:`trim_heap`)."""
    _, block = _block(model, index)
    for _, owner, attr, tensor, is_param in _slots(block, ""):
        if is_param:
            _set_(owner, attr, torch.empty_like(tensor, device="meta"), tensor, True)
    trim_heap()


@lru_cache(maxsize=1)
def _libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    """``malloc_trim(0)`` where glibc provides it: the block-sized buffers freed between blocks otherwise
    stay in the allocator's arenas, and resident memory creeps up block after block."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


def _outside_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """The parameter and persistent-buffer slots of ``model`` outside its decoder blocks."""
    blocks_name, _ = find_blocks(model)
    inside = f"{blocks_name}."
    return (slot for slot in _slots(model, "") if not slot[0].startswith(inside))


def _load_outside_blocks_(model: nn.Module, source: TensorSource) -> None:
    """Load every tensor outside the blocks that the checkpoint holds; tie the rest; refuse what is left."""
    for name, owner, attr, tensor, is_param in _outside_blocks(model):
        if name in source.files:
            _set_(owner, attr, source.read(name, tensor), tensor, is_param)
    model.tie_weights()  # e.g. lm_head.weight <- embed_tokens.weight (tie_word_embeddings)
    missing = sorted({name for name, _, _, tensor, _ in _outside_blocks(model) if tensor.is_meta})
    if missing:
        raise ValueError(f"model.offload: tensors {missing} are neither in the checkpoint nor tied to one")


def release_outside_(model: nn.Module, source: TensorSource) -> None:
    """Put every tensor outside the blocks that ``source`` holds, and any slot sharing one (tied), on
    ``meta`` (shape and dtype kept; :func:`_load_outside_blocks_` reads them again)."""
    slots = list(_outside_blocks(model))
    released = {id(tensor) for name, _, _, tensor, _ in slots if name in source.files}
    for _, owner, attr, tensor, is_param in slots:
        if id(tensor) in released and not tensor.is_meta:
            _set_(owner, attr, torch.empty_like(tensor, device="meta"), tensor, is_param)
    trim_heap()


def load_offloaded(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, TensorSource]:
    """The causal LM at ``path`` (eval mode, no hub access) with its decoder blocks on ``meta``, and where
    its tensors are."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    source = TensorSource.of_folder(path)
    _load_outside_blocks_(model, source)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    model.eval()
    model.config.use_cache = False
    logger.info("loaded %s with its %d decoder blocks offloaded", path, len(find_blocks(model)[1]))
    return model, source


def offloaded_blocks(model: nn.Module, source: TensorSource) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, block)`` of every block, materialised in turn (released when the next is asked
    for, or when the iteration ends)."""
    blocks_name, blocks = find_blocks(model)
    for index in range(len(blocks)):
        block = materialize_block_(model, source, index)
        try:
            yield f"{blocks_name}.{index}", block
        finally:
            release_block_(model, index)


class BlockSaver:
    """A pruned model written block by block as an HF folder (a temporary folder beside ``path`` until
    :meth:`commit`): ``model-00001-of-N.safetensors`` holds the tensors outside the blocks, shard ``i + 2``
    block ``i``; then ``model.safetensors.index.json``, config, generation config and tokenizer."""

    def __init__(self, model: nn.Module, path: str | Path, tokenizer: object | None = None):
        self.model, self.tokenizer, self.path = model, tokenizer, Path(path)
        self.blocks_name, blocks = find_blocks(model)
        self.shards = len(blocks) + 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp: Path | None = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}."))
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.written: set[int] = set()

    def _write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        file = f"model-{shard + 1:05d}-of-{self.shards:05d}.safetensors"
        save_file(
            {name: t.detach().contiguous() for name, t in tensors.items()}, self.tmp / file, {"format": "pt"}
        )
        self.weight_map.update(dict.fromkeys(tensors, file))
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def write_block(self, index: int, block: nn.Module) -> None:
        """Write block ``index`` (its parameters and persistent buffers) as its own shard."""
        prefix = f"{self.blocks_name}.{index}"
        self._write(index + 1, {f"{prefix}.{name}": t for name, t in block.state_dict().items()})
        self.written.add(index)

    def finish(self) -> TensorSource:
        """Write the rest (tensors outside the blocks, tied ones once), the index, config, generation config
        and tokenizer; the tensors of the folder written so far."""
        missing = sorted(set(range(self.shards - 1)) - self.written)
        if missing:
            raise RuntimeError(f"blocks {missing} were never written")
        rest: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, _, _, tensor, _ in _outside_blocks(self.model):
            if id(tensor) not in seen:  # a tied tensor under its first name (embed_tokens, not lm_head)
                seen.add(id(tensor))
                rest[name] = tensor
        self._write(0, rest)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        self.model.config.architectures = [type(self.model).__name__]  # as save_pretrained records it
        self.model.config.save_pretrained(self.tmp)
        if self.model.can_generate() and self.model.generation_config is not None:
            self.model.generation_config.save_pretrained(self.tmp)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.tmp)
        return TensorSource.of_folder(self.tmp)

    def commit(self) -> Path:
        """Move the finished folder to ``path`` (replacing what was there); the path."""
        if self.tmp is None or not (self.tmp / INDEX_FILE).is_file():
            raise RuntimeError("commit before finish")
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        self.tmp = None
        return self.path

    def discard(self) -> None:
        """Delete the temporary folder (nothing once committed)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


@dataclass
class OffloadedBlocks:
    """The :class:`~fedprune.sequential.BlockAccess` of an offloaded model: ``load`` materialises the block
    from ``source``; ``unload`` writes it to ``saver`` (if any, on success) and releases it."""

    model: nn.Module
    source: TensorSource
    saver: BlockSaver | None = field(default=None)

    def load(self, index: int) -> nn.Module:
        return materialize_block_(self.model, self.source, index)

    def unload(self, index: int, block: nn.Module, save: bool) -> None:
        if save and self.saver is not None:
            self.saver.write_block(index, block)
        release_block_(self.model, index)

    def copy(self, index: int) -> nn.Module:
        """Block ``index`` materialised into a copy of its meta module (the model is untouched)."""
        prefix, block = _block(self.model, index)
        return _fill_(copy.deepcopy(block), self.source, prefix)

    @contextmanager
    def outside_idle(self) -> Iterator[None]:
        """The checkpoint's tensors outside the blocks (embeddings, final norm, ``lm_head``; tied ones too)
        on ``meta`` for the ``with`` body, read again after it (errors included): only blocks run there."""
        release_outside_(self.model, self.source)
        try:
            yield
        finally:
            _load_outside_blocks_(self.model, self.source)


def _final_forwards(count: int, final: list[torch.Tensor], current: list[int]) -> list:
    """Stand-in forwards for ``count`` blocks: each passes its input on; the last returns the stored final
    hidden states ``final[current[0]]`` ``(batch, tokens, hidden)`` of the micro-batch being run."""

    def passthrough(*args: object, **kwargs: object) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def last(*args: object, **kwargs: object) -> torch.Tensor:
        return final[current[0]]

    return [passthrough] * (count - 1) + [last]


@torch.no_grad()
def run_blocks_offloaded(model: nn.Module, source: TensorSource, inputs: BlockInputs) -> BlockInputs:
    """Run every block from ``inputs.block`` on, one materialised at a time: the last block's outputs."""
    _, blocks = find_blocks(model)
    for index in range(inputs.block, len(blocks)):
        block = materialize_block_(model, source, index)
        try:
            inputs = run_block(block, inputs)
        finally:
            release_block_(model, index)
    return inputs


@torch.no_grad()
def offloaded_perplexity(
    model: nn.Module, source: TensorSource, windows: torch.Tensor, batch_size: int = 4, progress: bool = False
) -> Perplexity:
    """Held-out perplexity of the model whose blocks are in ``source``, one block in memory at a time
    (equals :func:`fedprune.eval.perplexity` of the model in memory, same micro-batches)."""
    final = run_blocks_offloaded(model, source, capture_block_inputs(model, windows, batch_size)).hidden
    _, blocks = find_blocks(model)
    current = [0]

    def logits_of(index: int, batch: torch.Tensor) -> torch.Tensor:
        current[0] = index
        return model(input_ids=batch, use_cache=False).logits  # (batch, tokens, vocab)

    if len(final) != len(list(micro_batches(windows, batch_size))):
        raise RuntimeError("captured micro-batches do not match the evaluation windows")
    with replaced_forwards(blocks, _final_forwards(len(blocks), final, current)):
        return perplexity_of(logits_of, windows, batch_size, progress)
