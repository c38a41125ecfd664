"""Hydra configs of cellrcnn (a package so Hydra finds them in an installed wheel)."""
