"""Quantized optimizer state: the storage formats, the quantized array, block codecs and the
``quantize_state`` wrapper with its bounded-memory step."""
