"""Building blocks: single-device math with logical axis names only."""
