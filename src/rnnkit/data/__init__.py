"""Data: corpora, vocabularies, TBPTT stream batching, time-series windows, padding/masks."""

from .streams import batchify, chunk_bounds, tbptt_plan

__all__ = ["batchify", "chunk_bounds", "tbptt_plan"]
