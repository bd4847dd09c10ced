"""evolution-router: delivers WhatsApp gateway events to every sink that asked for them."""

__version__ = "0.1.0"
