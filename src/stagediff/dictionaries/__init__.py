"""Dictionaries over activations: caches, sae_lens SAEs and their Lightning training,
evaluation, the crosscoder's paired data, splicing into a model, and ISaeRFT's adapter."""
