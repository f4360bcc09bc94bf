"""Thin Nipype interfaces: read inputs, call ``pipeline``, write files. No maths here."""

from workflows.interfaces.io import CheckInput, DerivativesSink, RecordsToTSV

__all__ = ["CheckInput", "DerivativesSink", "RecordsToTSV"]
