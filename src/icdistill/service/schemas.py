"""Request and response bodies of the JSON API (they also document it at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from icdistill.service.validate import MAX_LABEL_CHARS, MAX_PROMPT_CHARS, check_options, check_prompt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictJSON(_Strict):
    image_b64: str = Field(
        description="the image bytes (PNG, JPEG, ...) base64-encoded; URLs are never fetched"
    )
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    options: list[str] | None = Field(default=None, description="candidate answers (classification)")
    wait: bool = Field(default=False, description="wait for the teacher and return the distilled answer")
    label: str | None = Field(
        default=None, description="ground truth for evaluation; only the 'reference' teacher reads it"
    )

    _opts = field_validator("options")(classmethod(lambda cls, v: check_options(v)))
    _prompt = field_validator("prompt")(classmethod(lambda cls, v: check_prompt(v)))


class DemoIn(_Strict):
    """Checked as every demo is, by ``validate.demo_record``."""

    image_b64: str
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    label: str = Field(min_length=1, max_length=MAX_LABEL_CHARS)
    options: list[str] | None = None


class LabelIn(_Strict):
    label: str = Field(min_length=1, max_length=MAX_LABEL_CHARS)


class QueryOut(BaseModel):
    query_id: str
    position: int
    state: str = Field(description="answered, pending_teacher, pending_human, annotated, rejected or failed")
    answer: str = Field(
        description="the answer to use: the student's until the teacher (or a person) answers, then that "
        "label (answered_by 'teacher'), or with wait=true the student re-run with it (answered_by "
        "'student+new-demo')"
    )
    student_answer: str
    uncertainty: float | None
    teacher_asked: bool
    gate_reason: str | None
    demo_ids: list[int]
    teacher_answer: str | None
    answered_by: str
    pool_status: str | None
    error: str | None
    ledger: dict[str, Any] | None = None
    option_probs: dict[str, float | None] | None = None
    wait_timed_out: bool | None = None


class ErrorOut(BaseModel):
    error: dict[str, Any]


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "prompt": {"type": "string"},
                        "options": {"type": "string", "description": 'JSON list, e.g. ["cat", "dog"]'},
                        "wait": {"type": "boolean"},
                        "label": {"type": "string"},
                    },
                }
            },
            "application/json": {"schema": PredictJSON.model_json_schema()},
        },
    }
}
