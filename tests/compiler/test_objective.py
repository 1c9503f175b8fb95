"""The compiler's choice among searched candidates (compiler.objective), on hand-made candidates."""
from compiler.objective import Objective


def _c(name, tpot, hits, err):
    return {"name": name, "tpot_ms": tpot, "hit_rate": hits, "ppl_increase": err}


CANDS = [_c("lossless", 30.0, 0.70, 0.0), _c("drops", 20.0, 0.72, 0.004), _c("subs", 20.1, 0.80, 0.0045),
         _c("fast", 15.0, 0.75, 0.02), _c("hits", 25.0, 0.90, 0.012)]


def test_default_is_fastest_within_limit_with_hits_breaking_near_ties():
    best, why = Objective("ppl_increase", 0.005).choose(CANDS)
    assert best["name"] == "subs" and "default" in why          # 20.1 is within 1% of 20.0 and has more hits
    best, _ = Objective("ppl_increase", 0.03).choose(CANDS)
    assert best["name"] == "fast"


def test_most_hits_within_max_error():
    assert Objective("ppl_increase", 0.015, most_hits=True).choose(CANDS)[0]["name"] == "hits"
    assert Objective("ppl_increase", 0.0, most_hits=True).choose(CANDS)[0]["name"] == "lossless"


def test_tpot_target():
    best, why = Objective("ppl_increase", 0.005, tpot_target_ms=21.0).choose(CANDS)
    assert best["name"] == "drops" and "least ppl_increase" in why   # least error among those at <= 21 ms
    best, why = Objective("ppl_increase", 0.005, tpot_target_ms=10.0).choose(CANDS)
    assert best["name"] == "fast" and "no candidate" in why


def test_nothing_under_the_limit_falls_back_to_the_first():
    cands = [_c("lossless", 30.0, 0.7, 0.01), _c("x", 10.0, 0.9, 0.02)]
    assert Objective("ppl_increase", 0.005).choose(cands)[0]["name"] == "lossless"


def test_best_n_ranks_without_repeats():
    names = [c["name"] for c in Objective("ppl_increase", 0.005).best_n(CANDS, 3)]
    assert names == ["subs", "drops", "lossless"]
