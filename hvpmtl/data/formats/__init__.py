"""On-disk data formats and their readers (and writers where the format is written in one place)."""
