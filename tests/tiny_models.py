"""Tiny random-init causal LMs of several architectures, built from configs (no downloads).

:data:`ARCHITECTURES` are the dense ones every pipeline test runs on; :data:`MOE_ARCHITECTURES` store their
experts as fused 3-D parameters and a non-``Linear`` router (transformers 5), which the pruners cannot
prune: they need ``ignore`` patterns.
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

VOCAB = 96


def _configs():
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama": (
            LlamaForCausalLM,
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                **common,
            ),
        ),
        "opt": (
            OPTForCausalLM,
            OPTConfig(
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                max_position_embeddings=64,
                **common,
            ),
        ),
        "gpt2": (
            GPT2LMHeadModel,
            GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common),
        ),
        "qwen2": (
            Qwen2ForCausalLM,
            Qwen2Config(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                **common,
            ),
        ),
        # per-layer attention types: blocks get different masks (window 3 < the tests' 8-12 tokens)
        "qwen2_sliding": (
            Qwen2ForCausalLM,
            Qwen2Config(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                use_sliding_window=True,
                sliding_window=3,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                **common,
            ),
        ),
    }


def _moe_configs():
    common = dict(
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
    )
    return {
        # 4 experts gate_up (4, 32, 32), down (4, 32, 16); router (4, 32); shared expert of 32 + its gate
        "qwen2_moe": (
            Qwen2MoeForCausalLM,
            Qwen2MoeConfig(
                intermediate_size=64,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=32,
                num_experts=4,
                **common,
            ),
        ),
        # 4 experts gate_up (4, 32, 32), down (4, 32, 16); router (4, 32); no shared expert
        "mixtral": (
            MixtralForCausalLM,
            MixtralConfig(intermediate_size=16, num_local_experts=4, **common),
        ),
    }


ARCHITECTURES = ("llama", "opt", "gpt2", "qwen2")  # the models every parametrized test runs on
MIXED_ATTENTION = "qwen2_sliding"  # sliding and full attention layers, for the tests of per-block kwargs
MOE_ARCHITECTURES = tuple(_moe_configs())


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-init model of the given architecture, in eval mode."""
    cls, config = {**_configs(), **_moe_configs()}[arch]
    torch.manual_seed(seed)
    return cls(config).eval()


def random_windows(num_windows: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Random token ids ``(num_windows, tokens)``."""
    return torch.randint(
        3, VOCAB, (num_windows, tokens), generator=torch.Generator().manual_seed(seed)
    )


WORDS = (
    "the king queen lord lady sword crown night day love death speak hear come go good ill "
    "sweet fair foul heaven earth blood noble gentle friend enemy"
).split()


def write_tiny_corpus(
    folder, works=("alpha", "beta", "gamma", "delta", "hamlet", "macbeth"), seed=0
):
    """A folder of small synthetic ``<work>.txt`` files (a few thousand words each)."""
    import random
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for work in works:
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(400)]
        (folder / f"{work}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def tiny_tokenizer(texts):
    """A word-level fast tokenizer over ``texts`` (fits in :data:`VOCAB`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def save_tiny_checkpoint(folder, arch, corpus_folder, seed=0):
    """Save a tiny model of ``arch`` with a tokenizer trained on the corpus: an HF folder."""
    from pathlib import Path

    texts = [p.read_text() for p in sorted(Path(corpus_folder).glob("*.txt"))]
    model = tiny_model(arch, seed)
    model.save_pretrained(folder)
    tiny_tokenizer(texts).save_pretrained(folder)
    return Path(folder)
