"""Results, computed from records only: summaries and tables (report.py, continual.py), figures
(plots.py), leaderboards (leaderboard.py), regression checks (check.py) and the papers' numbers
(published.py)."""
