"""Runs a small eval with the fakes; used by the SIGKILL/resume test as a separate process."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fakes import FakeEmbedder, FakeStudent  # noqa: E402
from icdistill.eval.harness import EvalConfig, run_eval  # noqa: E402
from icdistill.models.reference import ReferenceTeacher  # noqa: E402
from icdistill.runner import Parts, RunConfig  # noqa: E402


class SlowStudent(FakeStudent):
    def predict(self, query, demos):
        time.sleep(float(sys.argv[4]))
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
    run_eval(config(data), out, resume=resume, parts=Parts(SlowStudent(), ReferenceTeacher(), FakeEmbedder()))
