"""The evaluation harness: Reliability / Generality / Locality under AG and TF, and Score."""

from .report import EvalReport
from .runner import evaluate
from .subject import PlainSubject, Subject, WeightEditSubject, as_subject

__all__ = ["EvalReport", "evaluate", "PlainSubject", "Subject", "WeightEditSubject", "as_subject"]
