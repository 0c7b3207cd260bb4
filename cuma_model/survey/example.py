"""One survey answer as a training example: `SurveyExample`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SurveyExample:
    """One (respondent, question) pair.

    `groups` maps a demographic dimension (e.g. "party") to the respondent's value label; it drives group metrics.
    `scores` are the ordinal values of the choices (for EMD), `scale` the question's (min, max) answer scale.
    """

    respondent_id: str
    question_id: str
    profile: str
    groups: dict[str, str]
    question: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]
    scale: tuple[float, float]
    target: int
    letters: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not self.letters:
            object.__setattr__(self, "letters", tuple(chr(ord("A") + i) for i in range(len(self.choices))))
        if not 0 <= self.target < len(self.choices):
            raise ValueError(f"target {self.target} out of range for {len(self.choices)} choices")
        if len(self.scores) != len(self.choices):
            raise ValueError("scores and choices differ in length")

    @property
    def target_letter(self) -> str:
        """The letter of the respondent's answer (what the model is trained to emit)."""
        return self.letters[self.target]
