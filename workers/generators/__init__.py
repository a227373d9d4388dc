"""Generator plugins, chosen by name with RELAY_GENERATOR."""

from __future__ import annotations

from models.settings import Settings
from workers.generators.base import GenerationReport, GenerationRequest, Generator, Turn
from workers.generators.demo import DemoGenerator

__all__ = ["GenerationReport", "GenerationRequest", "Generator", "Turn", "make_generator"]


def make_generator(settings: Settings) -> Generator:
    """Build the configured generator."""
    if settings.generator == "demo":
        return DemoGenerator(settings.demo_chunks_per_second, settings.demo_directives)
    if settings.generator == "openai":
        from workers.generators.openai_chat import OpenAIChatGenerator

        return OpenAIChatGenerator(settings)
    raise ValueError(
        f"unknown generator {settings.generator!r} (RELAY_GENERATOR); known: demo, openai"
    )
