"""Data: source readers and writers, the synthetic image-text world."""
