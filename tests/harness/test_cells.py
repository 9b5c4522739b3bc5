"""Jobs and their deal over the ranks of a torchrun run."""
from __future__ import annotations

from cdabench.harness.cells import Job, deal_longest_first


def test_cells_are_dealt_longest_first_to_the_least_loaded_rank():
    jobs = [Job(n, n, s, dict) for n, s in [("a", 2), ("b", 9), ("c", 4), ("d", 4), ("e", 1), ("f", 7)]]
    shares = deal_longest_first(jobs, 2)
    # b(9)->0; f(7)->1; c(4)->1 (7<9); d(4)->0 (9<11); a(2)->1 (11<13); e(1)->0 (13=13, lower rank)
    assert [[j.name for j in share] for share in shares] == [["b", "d", "e"], ["f", "c", "a"]]
    assert sorted(j.name for share in deal_longest_first(jobs, 4) for j in share) == list("abcdef")
