"""fedprune: federated, privacy-preserving pruning of language models.

``fedprune.load_pruned(path)`` loads any model fedprune saved (a structurally pruned one with different
widths per block included)."""

__all__ = ["load_pruned"]


def __getattr__(name: str):
    if name == "load_pruned":  # lazy: importing the package stays cheap
        from fedprune.structured.saved import load_pruned

        return load_pruned
    raise AttributeError(f"module 'fedprune' has no attribute {name!r}")
