"""HideNseek: server-side data-free pruning (SynFlow) plus client-learned sign supermasks.

Pure torch (no Flower, no Hydra). After Vallapuram et al., "HideNseek: Federated Lottery Ticket via
Server-side Pruning and Sign Supermask". The server prunes a randomly initialised network once, without
data; clients never train weights, they learn a sign ``s in {-1, +1}`` for every kept frozen weight and
upload one bit per kept weight per round; the server takes a majority vote.
"""
