"""Dataset reinforcement: teacher embeddings over stored augmentations, synthetic captions, reinforced shards."""
