"""Joining Ray (`ensure_ray`, the one way in) and shipping the driver's own modules to its workers."""
