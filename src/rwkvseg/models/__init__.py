"""Segmentation models and the registry that builds them by name."""

from .registry import create_model, list_models

__all__ = ["create_model", "list_models"]
