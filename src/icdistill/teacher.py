"""Teacher test-time scaling: N samples, a vote over normalised answers, and an agreement floor."""

from __future__ import annotations

import difflib
import re
import string
import time
from collections import Counter
from collections.abc import Sequence

from icdistill.errors import ICDError, TeacherError
from icdistill.protocols import Teacher
from icdistill.types import Annotation, Query

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalise_answer(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation or articles, single spaces."""
    t = text.strip().lower().translate(_PUNCT)
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())


def plain_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces; articles kept (an option may be the letter "A")."""
    return " ".join(text.strip().lower().translate(_PUNCT).split())


def _stem(token: str) -> str:
    # plurals name the same class ("sandals", "boots"); applied to both sides, so "dress" is harmless
    return token[:-1] if len(token) > 3 and token.endswith("s") and not token.endswith("ss") else token


def _phrases(option: str) -> list[tuple[str, ...]]:
    """Token forms an option goes by: the whole option and each '/'-separated alternative ("T-shirt/top")."""
    out: list[tuple[str, ...]] = []
    for part in [option, *re.split(r"[/|]", option)]:
        toks = tuple(_stem(t) for t in normalise_answer(part).split())
        if toks and toks not in out:
            out.append(toks)
    return out


def _spans(tokens: Sequence[str], phrase: tuple[str, ...]) -> list[tuple[int, int]]:
    """Where ``phrase`` occurs in ``tokens`` as whole words; a compound ("tshirt") matches its parts."""
    squashed = "".join(phrase)
    hits = []
    for i in range(len(tokens)):
        joined = ""
        for j in range(i, len(tokens)):
            joined += tokens[j]
            if tuple(tokens[i : j + 1]) == phrase or joined == squashed:
                hits.append((i, j + 1))
            if len(joined) >= len(squashed):
                break
    return hits


def match_option(text: str, options: Sequence[str]) -> str | None:
    """The option a free-text answer names, or None when it names none or is ambiguous.

    In order: the same normal form (letters such as "A" compared with articles kept); the longest
    whole-phrase occurrence of an option (or of one of its '/' alternatives) inside the answer, so
    "a t-shirt" names "T-shirt/top" and not "Shirt" (a phrase lying inside another option's longer
    match does not count); the answer's words forming part of exactly one option ("boot" ->
    "Ankle boot"); a close spelling of exactly one option ("gren" -> "green"). An empty answer names
    nothing, and so does one whose best matches tie between options.
    """
    plain = plain_answer(text)
    if not plain:
        return None
    # 1. the same normal form (with and without articles)
    same = [o for o in options if plain_answer(o) == plain]
    if not same:
        norm = normalise_answer(text)
        same = [o for o in options if norm and normalise_answer(o) == norm]
    if not same:
        squashed = "".join(_stem(t) for t in normalise_answer(text).split())
        same = [o for o in options if squashed and any("".join(p) == squashed for p in _phrases(o))]
    if len(set(same)) == 1:
        return same[0]
    if len(set(same)) > 1:
        return None
    tokens = [_stem(t) for t in normalise_answer(text).split()]
    if not tokens:
        return None
    # 2. an option named inside the answer: longest non-nested phrase occurrences win
    spans = {o: [s for p in _phrases(o) for s in _spans(tokens, p)] for o in options}
    spans = {o: s for o, s in spans.items() if s}

    def nested(a: tuple[int, int], other: str) -> bool:
        return any(b[0] <= a[0] and a[1] <= b[1] and b != a for b in spans[other])

    named = [o for o, ss in spans.items() if any(not any(nested(s, p) for p in spans if p != o) for s in ss)]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        return None
    # 3. the answer is part of exactly one option
    part_of = [o for o in options if any(_spans(p, tuple(tokens)) for p in _phrases(o))]
    if len(part_of) == 1:
        return part_of[0]
    if len(part_of) > 1:
        return None
    # 4. a typo of exactly one option (compared squashed, so spacing does not matter)
    squashed = "".join(tokens)
    ratios = {
        o: max(difflib.SequenceMatcher(None, squashed, "".join(p)).ratio() for p in _phrases(o))
        for o in options
        if _phrases(o)
    }
    close = sorted(((r, o) for o, r in ratios.items() if r >= 0.8), reverse=True)
    if close and (len(close) == 1 or close[0][0] - close[1][0] >= 0.1):
        return close[0][1]
    return None


def token_f1(a: str, b: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (SQuAD/VQA style)."""
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
    naming no option, or an empty one, votes for nothing but still counts in the agreement's
    denominator). A tie for the most votes has no winner: the answer is "" (the annotation is
    rejected) rather than whichever sample came first. Long answers (captions): the medoid of the
    non-empty samples, the one with the highest mean token-F1 to the others; agreement is that mean.
    """
    if not samples:
        return "", {}, 0.0
    if long_form and not options:
        keep = [i for i, s in enumerate(samples) if normalise_answer(s)]
        if not keep:
            return "", {}, 0.0
        if len(samples) == 1:
            return samples[0], {samples[0]: 1}, 1.0
        # empty samples are disagreement: they stay among the others a medoid is compared with
        means = {
            i: sum(token_f1(samples[i], o) for j, o in enumerate(samples) if j != i) / (len(samples) - 1)
            for i in keep
        }
        best = max(keep, key=lambda i: (means[i], -i))
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
            if not key:
                continue
        counts[key] += 1
        shown.setdefault(key, surface)
    votes = {shown[k]: c for k, c in counts.items()}
    if not counts:
        return "", votes, 0.0
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return "", votes, ranked[0][1] / len(samples)  # a tie names no answer
    winner = ranked[0][0]
    return shown[winner], votes, counts[winner] / len(samples)


def _faults_of(error: TeacherError) -> int:
    """Failed requests behind a TeacherError: its usage when the backend attached one, else the
    attempts its message reports ("no answer after 6 attempts"), else one."""
    usage = getattr(error, "usage", None)
    if usage is not None and getattr(usage, "faults", 0):
        return int(usage.faults)
    m = re.search(r"after (\d+) attempts", str(error))
    return int(m.group(1)) if m else 1


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
        try:
            resp = self.teacher.sample(query, self.n)
        except TeacherError as e:
            # a failed call costs time and faults too: keep them on the error for the run's accounting
            e.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
            e.faults = _faults_of(e)  # type: ignore[attr-defined]
            raise
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
