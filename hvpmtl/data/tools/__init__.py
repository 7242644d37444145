"""The offline data commands (`hvpmtl data ...`) and what they share."""
