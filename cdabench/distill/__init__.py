"""The distiller's stages: squeeze -> recover -> relabel -> post-train, and the selection baselines."""
