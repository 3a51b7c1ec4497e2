"""Shards in: WebDataset shard specs, the tar reader, sample decoding, and packing images into shards."""
