import pytest

from icdistill.errors import ICDError
from icdistill.eval.methods import METHODS, parse_method, split_methods
from icdistill.runner import RunConfig


def test_split_methods_keeps_options_with_their_method():
    specs = split_methods("student-zero-shot,icd:selector=random,shots=4,knn-pool:shots=5,icd")
    assert [s.raw for s in specs] == [
        "student-zero-shot",
        "icd:selector=random,shots=4",
        "knn-pool:shots=5",
        "icd",
    ]
    assert specs[1].options == {"selector": "random", "shots": "4"}


def test_unknown_method_and_option_are_refused():
    with pytest.raises(ICDError, match="unknown method 'icdd'"):
        parse_method("icdd")
    with pytest.raises(ICDError, match="unknown option 'nope'"):
        parse_method("icd:nope=1")
    with pytest.raises(ICDError, match="unknown option 'selector'"):
        parse_method("self-label:selector=random")
    with pytest.raises(ICDError, match="given twice"):
        split_methods("icd,icd")
    with pytest.raises(ICDError, match="key=value"):
        parse_method("icd:shots")
    with pytest.raises(ICDError, match="calls must be match or rate"):
        parse_method("icd-random-gate:calls=some")
    assert parse_method("icd-random-gate:calls=rate,shots=3").options == {"calls": "rate", "shots": "3"}


def test_run_config_of_each_method():
    base = RunConfig(dataset="x", n=10)
    cfg = METHODS["icd"].run_config(base, parse_method("icd:selector=random,shots=3"), 0.1, seed=4)
    assert (cfg.selector, cfg.shots, cfg.budget, cfg.seed, cfg.gate) == ("random", 3, 0.1, 4, "budget")
    zs = METHODS["student-zero-shot"].run_config(base, parse_method("student-zero-shot"), None, 1)
    assert (zs.gate, zs.shots, zs.budget) == ("never", 0, base.budget)
    knn = METHODS["knn-pool"].run_config(base, parse_method("knn-pool:shots=5"), 0.05, 0)
    assert (knn.shots, knn.uncertainty, knn.gate) == (5, "margin", "budget")
    assert (
        METHODS["icd-random-gate"].run_config(base, parse_method("icd-random-gate"), 0.05, 0).gate == "random"
    )
    assert METHODS["icd-forward"].run_config(base, parse_method("icd-forward"), 0.05, 0).answer == "forward"
    oracle = METHODS["oracle-icl"].run_config(
        base.__class__(teacher="openai:gpt-4o"), parse_method("oracle-icl"), None, 0
    )
    assert oracle.teacher == "reference" and oracle.gate == "always"
    with pytest.raises(ICDError, match="not a valid"):
        METHODS["icd"].run_config(base, parse_method("icd:shots=two"), 0.1, 0)


def test_finetune_is_refused_for_an_api_student():
    m = METHODS["finetune-online"]
    cfg = m.run_config(RunConfig(student="openai:gpt-4o-mini"), parse_method("finetune-online"), 0.05, 0)
    assert "local:smollm2" in m.refusal(cfg)
    assert m.refusal(m.run_config(RunConfig(), parse_method("finetune-online"), 0.05, 0)) is None
