"""Hessians for other tools: the on-disk format (``format``), the export driver (``export``) and QuIP#'s
layout (``quip``)."""
from __future__ import annotations

from .export import export_hessians
from .format import HessianFile, load_hessian, load_hessians
from .quip import read_quip_hessian, write_quip_hessians

__all__ = ["HessianFile", "export_hessians", "load_hessian", "load_hessians", "read_quip_hessian",
           "write_quip_hessians"]
