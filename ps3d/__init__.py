"""The ``ps3d`` command line: one entry point for the whole platform."""
