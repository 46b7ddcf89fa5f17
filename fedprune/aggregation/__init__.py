"""Server-side aggregation: mask voting (FedPrLLM) and exact sums of statistics."""
