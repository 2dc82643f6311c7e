"""The compute engines: continuous-batching decoding, KV caches, shared prefixes, attention, batching."""
