"""Integrations with training libraries: transformers' Trainer (and the TRL trainers built on it)."""
from .trainer import CuMACallback, add_demographic_embeds

__all__ = ["CuMACallback", "add_demographic_embeds"]
