"""Write a randomly initialised Llama of about 1.2B parameters as an fp32 HF folder, block by block.

The shape is TinyLlama-1.1B's (hidden 2048, 22 layers, intermediate 5632, 32 heads / 4 KV heads), untied,
with the bundled SmolLM2 tokenizer's vocabulary (49152), so the bundled tokenizer and corpus work with it;
the tokenizer is saved beside the weights. The model is built on the ``meta`` device and each decoder
block is initialised and written on its own (:class:`fedprune.offload.BlockSaver`: one shard per block,
one for the rest), so this script holds the embeddings, ``lm_head`` and one block at a time (~1.5 GB).
For measuring ``model.offload=true`` (experiments/results/offload.md); its perplexity is meaningless.

Usage: python experiments/make_random_llama.py OUT_DIR [--layers 22] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("make_random_llama")


def llama_config(vocab_size: int, layers: int):
    """TinyLlama-1.1B's shape, untied, fp32."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype="float32",
    )


@torch.no_grad()
def init_(module: nn.Module, std: float, generator: torch.Generator) -> nn.Module:
    """Give ``module``'s meta parameters real storage: matrices ~ N(0, std²), vectors (norms) ones."""
    module.to_empty(device="cpu", recurse=True)
    for param in module.parameters():
        if param.dim() > 1:
            param.normal_(0.0, std, generator=generator)  # (out, in) or (vocab, hidden)
        else:
            param.fill_(1.0)
    return module


def write_random_llama(out: Path, layers: int = 22, seed: int = 0) -> Path:
    """Write the model and the SmolLM2 tokenizer to ``out`` (atomically); the folder."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from fedprune.data.assets import ensure_model
    from fedprune.models import find_blocks, load_tokenizer
    from fedprune.offload import BlockSaver

    tokenizer = load_tokenizer(ensure_model("smollm2-135m"))
    config = llama_config(len(tokenizer), layers)
    with init_empty_weights():  # parameters on meta, rotary buffers real
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    saver = BlockSaver(model, out, tokenizer)
    try:
        _, blocks = find_blocks(model)
        for index, block in enumerate(blocks):
            saver.write_block(index, init_(copy.deepcopy(block), std, generator))  # then freed
            logger.info("block %d / %d written", index + 1, len(blocks))
        for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
            init_(module, std, generator)
        saver.finish()
        path = saver.commit()
    finally:
        saver.discard()
    count = sum(p.numel() for p in model.parameters())  # meta blocks count too
    logger.info("wrote %s: %.3fB parameters", path, count / 1e9)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_random_llama(args.out, args.layers, args.seed)

    from fedprune.outputs import peak_rss_mb

    logger.info("peak RSS %.0f MB", peak_rss_mb())


if __name__ == "__main__":
    main()
