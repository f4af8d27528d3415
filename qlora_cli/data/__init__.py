"""Data: sources (files, hub folders) -> formats and chat templates -> token ids and labels -> the
tokenization cache -> batches and packs. ``pipeline`` is the path a run takes; ``preprocess`` fills the cache."""
