"""icdistill: online in-context distillation of vision-language models."""

from icdistill.errors import DataError, ICDError, SpecError, TeacherError
from icdistill.protocols import Embedder, Gate, Pool, Selector, Student, Teacher
from icdistill.types import (
    Annotation,
    Demo,
    GateContext,
    GateDecision,
    Prediction,
    Query,
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
