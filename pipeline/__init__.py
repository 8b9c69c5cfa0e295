"""backprop-pipeline: multi-layer perceptrons trained by hand-written backpropagation.

The numerical core (``nn``, ``activations``, ``losses``, ``init``, ``optim``,
``trainer``, ``gradcheck``) is plain numpy and can be used from a notebook::

    from pipeline.nn import MLP
    from pipeline.optim import make_optimizer
    from pipeline.trainer import fit

    model = MLP([2, 16, 16, 1], activation="tanh", output="sigmoid", seed=0)
    history = fit(model, X, y, loss="bce", optimizer=make_optimizer("adam", lr=0.01),
                  epochs=300)

Hydra and MLflow stay at the edge (``train.py``, ``pipeline.app``, ``pipeline.tracking``).
"""

__version__ = "0.1.0"
__all__ = ["MLP", "MLPClassifier"]


def __getattr__(name: str):
    # Loaded when asked for: the estimator imports sklearn, and even numpy is worth not
    # importing before train.py has started its tracking service (pipeline.tracking_service).
    if name == "MLP":
        from pipeline.nn import MLP

        return MLP
    if name == "MLPClassifier":
        from pipeline.estimator import MLPClassifier

        return MLPClassifier
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["MLP", "MLPClassifier", "__version__"]
