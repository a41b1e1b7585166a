"""Templates, static files and translations, shipped as package data."""
