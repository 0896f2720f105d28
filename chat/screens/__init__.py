"""Modal screens: help, settings, saved conversations."""
