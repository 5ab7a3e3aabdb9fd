"""dflash_models."""
