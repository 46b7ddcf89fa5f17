"""Block-by-block loading (fedprune.offload) on tiny random-init models saved as HF folders: offloaded
pruning saves exactly the in-memory weights, the saved folder loads with plain transformers, block-by-block
perplexity equals the in-memory one, and only one block is ever materialised."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedprune.eval import perplexity
from fedprune.masks import parse_pattern
from fedprune.models import find_blocks, load_causal_lm, sparsity_report
from fedprune.offload import (
    INDEX_FILE,
    BlockSaver,
    OffloadedBlocks,
    TensorSource,
    load_offloaded,
    materialize_block_,
    offloaded_blocks,
    offloaded_perplexity,
    release_block_,
)
from fedprune.pruners import get_pruner
from fedprune.sequential import prune_model_
from tests.tiny_models import ARCHITECTURES, random_windows, tiny_model


def _save(tmp_path, arch, **save_kwargs):
    folder = tmp_path / f"dense-{arch}"
    tiny_model(arch).save_pretrained(folder, **save_kwargs)
    return folder


def _block_params_on_meta(model) -> bool:
    _, blocks = find_blocks(model)
    return all(p.is_meta for p in blocks.parameters())


def _outside_params(model) -> dict:
    blocks_name, _ = find_blocks(model)
    return {n: p for n, p in model.named_parameters() if not n.startswith(f"{blocks_name}.")}


class CountingBlocks(OffloadedBlocks):
    """Offloaded blocks that record how many blocks were materialised at once, and whether every weight
    outside the blocks was set aside whenever a block was."""

    most = 0
    outside_live = False

    def load(self, index):
        block = super().load(index)
        _, blocks = find_blocks(self.model)
        live = sum(not all(p.is_meta for p in b.parameters()) for b in blocks)
        self.most = max(self.most, live)
        self.outside_live |= not all(p.is_meta for p in _outside_params(self.model).values())
        return block


def _prune_offloaded(folder, out, pruner, ids):
    model, source = load_offloaded(folder)
    blocks = CountingBlocks(model, source, BlockSaver(model, out))
    report = prune_model_(model, ids, pruner, 0.5, parse_pattern("unstructured"), 4, False, blocks=blocks)
    pruned = blocks.saver.finish()
    return model, pruned, blocks, report


@pytest.mark.parametrize(
    "arch,pruner", [("llama", "wanda"), ("llama", "sparsegpt"), ("opt", "sparsegpt"), ("gpt2", "wanda")]
)
def test_offloaded_pruning_saves_the_in_memory_weights(tmp_path, arch, pruner):
    folder, ids = _save(tmp_path, arch), random_windows(8, 12)
    expected = load_causal_lm(folder)
    expected_report = prune_model_(
        expected, ids, get_pruner(pruner), 0.5, parse_pattern("unstructured"), 4, False
    )

    model, _, blocks, report = _prune_offloaded(folder, tmp_path / "out", get_pruner(pruner), ids)
    assert blocks.most == 1 and _block_params_on_meta(model)
    assert not blocks.outside_live  # embeddings and head on meta during the block loop, read back after it
    for name, param in _outside_params(model).items():
        assert torch.equal(param, expected.get_parameter(name)), name
    assert report.layer_sparsity == expected_report.layer_sparsity
    assert report.calib_tokens == expected_report.calib_tokens
    assert not (tmp_path / "out").exists()  # only the temporary folder until commit
    saved = blocks.saver.commit()
    assert not list(tmp_path.glob(".out.*"))

    loaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    got, want = loaded.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected(input_ids=ids).logits)
    index = json.loads((saved / INDEX_FILE).read_text())
    assert (
        len(set(index["weight_map"].values())) == len(find_blocks(expected)[1]) + 1
    )  # a shard per block + rest
    assert (saved / "config.json").is_file() and (saved / "generation_config.json").is_file()


def test_tied_embeddings_are_saved_once_and_stay_tied(tmp_path):
    folder, ids = _save(tmp_path, "gpt2"), random_windows(4, 12)  # GPT-2 ties lm_head to wte
    model, source = load_offloaded(folder)
    assert model.lm_head.weight is model.transformer.wte.weight
    blocks = OffloadedBlocks(model, source, BlockSaver(model, tmp_path / "out"))
    prune_model_(model, ids, get_pruner("wanda"), 0.5, parse_pattern("unstructured"), 4, False, blocks=blocks)
    assert model.lm_head.weight is model.transformer.wte.weight and not model.lm_head.weight.is_meta
    blocks.saver.finish()
    names = json.loads((blocks.saver.commit() / INDEX_FILE).read_text())["weight_map"]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_by_block_perplexity_equals_in_memory(tmp_path, arch):
    folder, ids = _save(tmp_path, arch), random_windows(7, 12)  # 7 windows: a last micro-batch of 3
    model, source = load_offloaded(folder)
    assert _block_params_on_meta(model)
    expected = perplexity(load_causal_lm(folder), ids, batch_size=4)
    assert offloaded_perplexity(model, source, ids, batch_size=4) == expected
    assert _block_params_on_meta(model)


def test_a_sharded_checkpoint_loads_block_by_block(tmp_path):
    folder = _save(tmp_path, "llama", max_shard_size="40KB")
    assert (folder / INDEX_FILE).is_file() and len(set(TensorSource.of_folder(folder).files.values())) > 1
    model, source = load_offloaded(folder)
    dense = load_causal_lm(folder)
    want = dense.state_dict()
    for index in range(len(find_blocks(model)[1])):
        block = materialize_block_(model, source, index)
        for name, tensor in block.state_dict().items():
            assert torch.equal(tensor, want[f"model.layers.{index}.{name}"]), name
        release_block_(model, index)
    assert _block_params_on_meta(model)
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)


def test_sparsity_report_over_offloaded_blocks_equals_in_memory(tmp_path):
    folder, ids = _save(tmp_path, "llama"), random_windows(4, 12)
    expected = load_causal_lm(folder)
    prune_model_(expected, ids, get_pruner("wanda"), 0.5, parse_pattern("unstructured"), 4, False)
    model, pruned, _, _ = _prune_offloaded(folder, tmp_path / "out", get_pruner("wanda"), ids)
    ignore = ("*.o_proj",)
    assert sparsity_report(model, ignore, offloaded_blocks(model, pruned)) == sparsity_report(
        expected, ignore
    )
    assert _block_params_on_meta(model)


def test_a_failed_run_leaves_no_folder(tmp_path):
    folder = _save(tmp_path, "llama")
    model, source = load_offloaded(folder)
    saver = BlockSaver(model, tmp_path / "out")
    saver.write_block(0, materialize_block_(model, source, 0))
    with pytest.raises(RuntimeError, match=r"blocks \[1\] were never written"):
        saver.finish()
    saver.discard()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_folder_without_safetensors_is_refused(tmp_path):
    folder = _save(tmp_path, "llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_offloaded(folder)


def test_weights_outside_the_blocks_are_read_back_after_a_failed_block(tmp_path):
    folder, ids = _save(tmp_path, "llama"), random_windows(4, 12)
    model, source = load_offloaded(folder)
    wanda = get_pruner("wanda")

    def fail(*args, **kwargs):
        raise RuntimeError("pruner failed")

    wanda.prune = fail
    with pytest.raises(RuntimeError, match="pruner failed"):
        prune_model_(
            model,
            ids,
            wanda,
            0.5,
            parse_pattern("unstructured"),
            4,
            False,
            blocks=OffloadedBlocks(model, source),
        )
    dense = load_causal_lm(folder)
    outside = _outside_params(model)
    assert outside and not any(p.is_meta for p in outside.values())
    for name, param in outside.items():
        assert torch.equal(param, dense.get_parameter(name)), name
