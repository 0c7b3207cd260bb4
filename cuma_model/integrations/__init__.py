"""Integrations with training libraries: transformers' Trainer (and the TRL trainers built on it), and `peft`
(CuMA as a registered PEFT method, see `cuma_model.integrations.peft`)."""
from .trainer import CuMACallback, add_demographic_embeds

__all__ = ["CuMACallback", "add_demographic_embeds"]
