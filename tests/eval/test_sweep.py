from fakes import FakeEmbedder, FakeStudent, colour_folder
from icdistill.eval.sweep import Arm, markdown_table, plot_tradeoff, run_sweep
from icdistill.models.reference import ReferenceTeacher
from icdistill.runner import Parts, RunConfig


def test_sweep_medians_table_and_plot(tmp_path):
    data = colour_folder(tmp_path / "c", n_per_class=6)
    base = RunConfig(dataset=str(data), n=16, warmup=2, shots=2)
    arms = [Arm("never", {"gate": "never"}), Arm("icd 25%", {"budget": 0.25})]
    seen = []
    res = run_sweep(
        base,
        arms,
        seeds=[0, 1, 2],
        parts=Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder()),
        on_run=lambda arm, seed, s: seen.append((arm, seed, s["n_queries"])),
    )
    assert [(a, s) for a, s, _ in seen] == [(a.name, s) for a in arms for s in (0, 1, 2)]
    never, icd = res["arms"]["never"], res["arms"]["icd 25%"]
    assert len(icd["runs"]) == 3
    accs = sorted(r["accuracy"] for r in icd["runs"])
    assert icd["accuracy"]["median"] == accs[1] and icd["accuracy"]["min"] == accs[0]
    assert never["teacher_call_rate"]["max"] == 0.0
    assert icd["accuracy"]["median"] > never["accuracy"]["median"]
    table = markdown_table(res, baseline="never")
    assert "| icd 25% |" in table and "x |" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())
    plot_tradeoff(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
