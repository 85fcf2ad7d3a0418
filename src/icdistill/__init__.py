"""icdistill: online in-context distillation of vision-language models."""

from icdistill.protocols import Embedder, Gate, Pool, Selector, Student, Teacher
from icdistill.types import (
    Annotation,
    DataError,
    Demo,
    GateContext,
    GateDecision,
    ICDError,
    Prediction,
    Query,
    SpecError,
    TeacherError,
    TeacherResponse,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "Annotation",
    "DataError",
    "Demo",
    "Embedder",
    "Gate",
    "GateContext",
    "GateDecision",
    "ICDError",
    "Pool",
    "Prediction",
    "Query",
    "Selector",
    "SpecError",
    "Student",
    "Teacher",
    "TeacherError",
    "TeacherResponse",
    "Usage",
]
