"""Hessians for other tools: the on-disk format (``format``) and the export driver (``export``)."""
from __future__ import annotations

from .export import export_hessians
from .format import HessianFile, load_hessian, load_hessians

__all__ = ["HessianFile", "export_hessians", "load_hessian", "load_hessians"]
