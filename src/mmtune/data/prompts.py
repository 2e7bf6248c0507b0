"""Prompt templates per task (paper fig. 3), configurable from YAML, the CLI or Python."""

from __future__ import annotations

import string
from dataclasses import dataclass

__all__ = ["DEFAULT_PROMPTS", "PromptFieldError", "PromptTemplate"]


class PromptFieldError(KeyError, ValueError):
    """A sample lacks a field its prompt template needs (a user's data or template mistake)."""


@dataclass
class PromptTemplate:
    """A ``str.format`` template whose ``{fields}`` are filled from each sample."""

    template: str
    """E.g. ``Segment the {expression} according to the text. #Segmentation:``."""

    def __post_init__(self) -> None:
        if not self.fields:
            raise ValueError(f"prompt template {self.template!r} has no {{field}} to fill")

    @property
    def fields(self) -> set[str]:
        try:
            return {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        except ValueError as e:
            raise ValueError(f"prompt template {self.template!r}: {e}") from e

    def __call__(self, **values: str) -> str:
        missing = self.fields - set(values)
        if missing:
            raise PromptFieldError(
                f"prompt template {self.template!r} needs {sorted(missing)}; the sample has "
                f"{sorted(values)}"
            )
        return self.template.format(**{k: str(v).strip() for k, v in values.items()})


DEFAULT_PROMPTS: dict[str, str] = {
    # the paper's own template (sec. 4)
    "segmentation": "Segment the {expression} according to the text. #Segmentation:",
    "classification": "Classify the food described by the title: {text}. #Category:",
    "entailment": "Is the statement supported by the image? Statement: {text}. #Relation:",
    "sentiment": "Rate the sentiment of the sentence: {text}. #Sentiment:",
}
