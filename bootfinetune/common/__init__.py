"""Leaf helpers that import nothing of ours: chat records, model strings, import paths, redaction, folder names."""
