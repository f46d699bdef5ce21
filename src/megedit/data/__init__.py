"""Edit requests and the loaders that read them from the common edit-data formats."""

from .loaders import KINDS, count_records, load_requests, parse_data_arg
from .requests import EditRequest, LocalityQuery

__all__ = ["EditRequest", "LocalityQuery", "KINDS", "count_records", "load_requests", "parse_data_arg"]
