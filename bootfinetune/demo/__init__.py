"""The offline demo: a shipped two-predictor task (`task.py`) and `bootfinetune demo` itself (`run.py`)."""
