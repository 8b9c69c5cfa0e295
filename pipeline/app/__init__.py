"""The application edge: Hydra's config schema, one training job, sweeps, the terminal.

The only package that knows config keys and Hydra; it builds plain objects and hands them
to the engine, the data, tracking and viz.
"""
