"""A persistent, content-addressed KV block store (store.py: files, keys, checksums, index,
eviction; prefix.py: a model's prompt prefixes in it)."""
