"""Corpora in, shards out: formats, the prepare pipeline, the shard reader."""
