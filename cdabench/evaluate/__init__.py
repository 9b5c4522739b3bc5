"""The evaluate stage: a distilled set in, a measurement out (returned, never written): post-train
(posttrain.py) and the continual protocols (continual/)."""
