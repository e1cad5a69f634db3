"""Roost: a WhatsApp-style messaging server with durable delivery."""

__version__ = "0.1.0"
