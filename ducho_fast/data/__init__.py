"""Readers per modality: listing items, decoding them, and checking their ids."""
