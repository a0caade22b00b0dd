"""Tokens: intensity views, foreground, 4 x 16 x 16 patches with grid coordinates, the cache."""
