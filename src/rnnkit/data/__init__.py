"""Data: corpora, vocabularies, TBPTT stream batching, time-series windows, padding/masks."""
