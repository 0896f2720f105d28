"""The chat screen's parts: prompt input, message rows, status bar."""
