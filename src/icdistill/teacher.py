"""Teacher test-time scaling: N samples, a vote over normalised answers, and an agreement floor."""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from collections.abc import Sequence

from icdistill.protocols import Teacher
from icdistill.types import Annotation, ICDError, Query

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalise_answer(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation or articles, single spaces."""
    t = text.strip().lower().translate(_PUNCT)
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())


def match_option(text: str, options: Sequence[str]) -> str | None:
    """The option a free-text answer names: exact normalised match, else a unique containment."""
    norm = normalise_answer(text)
    by_norm = {normalise_answer(o): o for o in options}
    if norm in by_norm:
        return by_norm[norm]
    hits = [o for n, o in by_norm.items() if n and (n in norm.split() or f" {n} " in f" {norm} ")]
    if len(hits) == 1:
        return hits[0]
    starts = [o for n, o in by_norm.items() if n and norm.startswith(n)]
    return starts[0] if len(starts) == 1 else None


def _token_f1(a: str, b: str) -> float:
    ta, tb = normalise_answer(a).split(), normalise_answer(b).split()
    if not ta or not tb:
        return float(ta == tb)
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def vote(
    samples: Sequence[str], options: Sequence[str] | None = None, long_form: bool = False
) -> tuple[str, dict[str, int], float]:
    """Aggregate N teacher samples into (answer, votes, agreement in [0, 1]).

    Short answers: majority over normalised forms (mapped onto ``options`` when given; a sample
    naming no option votes for nothing). Long answers (captions): the medoid, the sample with the
    highest mean token-F1 to the others; agreement is that mean.
    """
    if not samples:
        return "", {}, 0.0
    if long_form and not options:
        if len(samples) == 1:
            return samples[0], {samples[0]: 1}, 1.0
        means = [
            sum(_token_f1(s, o) for j, o in enumerate(samples) if j != i) / (len(samples) - 1)
            for i, s in enumerate(samples)
        ]
        best = max(range(len(samples)), key=lambda i: (means[i], -i))
        return samples[best], {samples[best]: 1}, float(means[best])
    counts: Counter[str] = Counter()
    shown: dict[str, str] = {}
    for s in samples:
        if options:
            opt = match_option(s, options)
            if opt is None:
                continue
            key, surface = opt, opt
        else:
            key = normalise_answer(s)
            surface = s.strip()
        counts[key] += 1
        shown.setdefault(key, surface)
    if not counts:
        return "", {}, 0.0
    # ties go to the answer seen first, so the vote is deterministic
    order = {k: i for i, k in enumerate(shown)}
    winner = max(counts, key=lambda k: (counts[k], -order[k]))
    votes = {shown[k]: c for k, c in counts.items()}
    return shown[winner], votes, counts[winner] / len(samples)


class TestTimeScaling:
    """Asks a teacher for N samples, votes, and rejects annotations whose agreement is below the floor."""

    __test__ = False  # not a pytest test class

    def __init__(
        self, teacher: Teacher, n: int = 1, agreement_floor: float = 0.0, long_form_words: int = 6
    ) -> None:
        if n < 1:
            raise ICDError(f"number of teacher samples must be >= 1, got {n}")
        if not 0.0 <= agreement_floor <= 1.0:
            raise ICDError(f"agreement floor must be in [0, 1], got {agreement_floor}")
        self.teacher = teacher
        self.n = n
        self.agreement_floor = agreement_floor
        self.long_form_words = long_form_words

    def annotate(self, query: Query) -> Annotation:
        """One teacher request of N samples; raises TeacherError when the teacher fails."""
        t0 = time.perf_counter()
        resp = self.teacher.sample(query, self.n)
        samples = [str(a) for a in resp.answers]
        long_form = query.options is None and any(len(s.split()) >= self.long_form_words for s in samples)
        answer, votes, agreement = vote(samples, query.options, long_form=long_form)
        accepted = bool(answer) and agreement >= self.agreement_floor
        return Annotation(
            answer=answer,
            samples=samples,
            votes=votes,
            agreement=agreement,
            accepted=accepted,
            teacher=self.teacher.name,
            usage=resp.usage,
            seconds=time.perf_counter() - t0,
        )
