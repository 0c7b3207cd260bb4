"""Integrations with training libraries: transformers' Trainer and TRL's trainers (`CuMACollator` carries z
through their collators, `CuMACallback` logs the aux loss), and `peft` (CuMA as a registered PEFT method, see
`cuma_model.integrations.peft`)."""
from .collator import CuMACollator
from .pipeline import CuMATextGenerationPipeline
from .trainer import CuMACallback, add_demographic_embeds

__all__ = ["CuMACallback", "CuMACollator", "CuMATextGenerationPipeline", "add_demographic_embeds"]
