"""Data side: reading sources, chat templates, tokenization, packing, collation and data-pipeline stages."""
