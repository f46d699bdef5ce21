"""The evaluation harness: Reliability / Generality / Locality under AG and TF, and Score."""

from ..runtime.subject import PlainSubject, Subject, WeightEditSubject, as_subject  # what it evaluates
from .report import EvalReport
from .runner import case_scores, evaluate

__all__ = ["EvalReport", "case_scores", "evaluate", "PlainSubject", "Subject", "WeightEditSubject", "as_subject"]
