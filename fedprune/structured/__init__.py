"""Structured pruning: whole FFN neurons, key/value head groups, attention sublayers and blocks removed,
so that the saved model is physically smaller and faster."""
