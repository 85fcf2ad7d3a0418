"""Runs a small eval with the fakes; used by the SIGKILL/resume tests as a separate process.

argv: dataset out fresh|resume seconds-per-prediction [ray [ADDRESS]]  (ray: on Ray, a local 2-CPU
instance or the running one at ADDRESS)"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fakes import FakeEmbedder, FakeStudent  # noqa: E402
from icdistill.eval.harness import EvalConfig, run_eval  # noqa: E402
from icdistill.models.reference import ReferenceTeacher  # noqa: E402
from icdistill.runner import Parts, RunConfig  # noqa: E402


class SlowStudent(FakeStudent):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay  # not read from sys.argv at predict time: on a Ray actor that is Ray's

    def predict(self, query, demos):
        time.sleep(self.delay)
        return super().predict(query, demos)


def config(data: str) -> EvalConfig:
    return EvalConfig(
        base=RunConfig(dataset=data, n=12, warmup=2, shots=2),
        methods=("student-zero-shot", "icd", "knn-pool", "self-label"),
        budgets=(0.25,),
        seeds=(0, 1),
    )


if __name__ == "__main__":
    data, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
    runner = None
    if sys.argv[5:6] == ["ray"]:
        from icdistill.eval.ray_runner import RayCells, RayOptions

        address = sys.argv[6] if len(sys.argv) > 6 else None
        runner = RayCells(RayOptions(address=address) if address else RayOptions(cpus=2))
    parts = Parts(SlowStudent(float(sys.argv[4])), ReferenceTeacher(), FakeEmbedder())
    run_eval(config(data), out, resume=resume, parts=parts, runner=runner)
