"""cai: Constitutional AI / RLAIF on your own model and constitution."""

__version__ = "0.1.0"
