"""Continual learning: class-incremental scenarios over any task, the papers' `retrain` protocol
(with the unseen-class leak of its teacher masked) and `sequential` training through Avalanche
strategies, with replay memories of equal size from real exemplars or distilled images."""
