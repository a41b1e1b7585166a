"""Consult: a self-hosted video follow-up clinic."""

__version__ = "0.1.0"
