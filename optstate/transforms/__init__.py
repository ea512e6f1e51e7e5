"""Building blocks: one gradient transformation per update rule (Optax's names and defaults).

Each module holds one family (Adam, RMS, momentum, ...); the public names are re-exported
flat from :mod:`optstate`.
"""
