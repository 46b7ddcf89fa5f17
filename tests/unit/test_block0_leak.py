"""What the block-0 statistics reveal (docs/privacy.md, "Who sees what"): the inputs of block 0's first
layers are the normalized embeddings of the site's tokens, known to the server, so the Gram matrix a site
sends with ``privacy=none`` (or the pooled one with ``secagg``) determines the site's token histogram
whenever there are fewer vocabulary entries than Gram entries: a least-squares solve recovers it exactly."""

import torch

from fedprune.site import site_block_stats, start_site
from tests.tiny_models import VOCAB, tiny_model


def test_the_block0_gram_reveals_the_token_histogram():
    model = tiny_model("llama")
    with torch.no_grad():  # explicit embeddings: independent of any weight-init state other tests leave
        model.model.embed_tokens.weight.copy_(
            torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(2))
        )
    ids = torch.randint(3, VOCAB, (6, 16), generator=torch.Generator().manual_seed(1))  # a site's windows
    stats = site_block_stats(model, start_site(model, ids, batch_size=3), 0, "hessian")
    (name,) = [n for n in stats if n.endswith("q_proj")]
    gram = stats[name].total  # (hidden, hidden) Σ_t x_t x_tᵀ, what the site sends
    # the attacker's side: every vocabulary entry's block-0 input, from the public model alone
    with torch.no_grad():
        layer = model.model.layers[0]
        e = layer.input_layernorm(model.model.embed_tokens.weight).double()  # (vocab, hidden)
    rows, cols = torch.triu_indices(e.shape[1], e.shape[1])
    design = (e[:, rows] * e[:, cols]).T  # (hidden·(hidden+1)/2, vocab): Gram entries per token
    counts = torch.linalg.lstsq(design, gram[rows, cols].double().unsqueeze(1)).solution.squeeze(1)
    truth = torch.bincount(ids.reshape(-1), minlength=VOCAB).double()
    assert design.shape[0] > VOCAB  # more equations than unknowns: the histogram is determined
    assert torch.allclose(counts, truth, atol=1e-3), (counts - truth).abs().max()
    assert torch.equal(counts.round(), truth) and int(truth.sum()) == 96
