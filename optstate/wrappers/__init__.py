"""Transforms that wrap other transforms: masking, partitioning, finiteness checks and
hyperparameter injection."""
