"""Joining Ray (`ensure_ray`, the one way in), shipping the driver's own modules to its workers as code, and
placing the work that runs a model where a training worker's resources are."""
