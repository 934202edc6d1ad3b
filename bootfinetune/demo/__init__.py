"""The offline demo's task (`task.py`) and student (`run.py`, `cache.py`); the `bootfinetune demo` command
itself is `entrypoints/demo.py`."""
