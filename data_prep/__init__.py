"""Offline, idempotent data preparation: raw videos -> canonical clips -> WebDataset shards."""
