"""backprop-pipeline: multi-layer perceptrons trained by hand-written backpropagation.

Where things live (start reading at ``pipeline/engine/mlp.py``):

- ``pipeline.engine``: the math, numpy and the standard library only. The MLP and its
  backward pass, activations, losses, initialisers, optimisers, the training loop,
  gradient checking and a scalar autodiff. What a student opens.
- ``pipeline.fast``: the same math made fast: compiled steps, in-place kernels, replicas
  trained side by side; ``pipeline.fit`` is ``pipeline.fast.fit``.
- ``pipeline.data``: the datasets (scikit-learn generators, CSV), split and standardised.
- ``pipeline.estimators``: scikit-learn compatible estimators around the engine.
- ``pipeline.app``: the Hydra edge: config schema, one job, sweeps.
- ``pipeline.tracking``: MLflow, and the only package that imports it.
- ``pipeline.viz``: figures and the sweep report.

From a notebook::

    from pipeline import MLP, fit, make_optimizer

    model = MLP([2, 16, 16, 1], activation="tanh", output="sigmoid", seed=0)
    history = fit(model, X, y, loss="bce", optimizer=make_optimizer("adam", lr=0.01),
                  epochs=300)
"""

__version__ = "0.1.0"

_EXPORTS = {
    "MLP": "pipeline.engine.mlp",
    "fit": "pipeline.fast",
    "make_optimizer": "pipeline.engine.optim",
    "make_dataset": "pipeline.data.datasets",
    "MLPClassifier": "pipeline.estimators",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    # Loaded when asked for: the estimator imports scikit-learn, and `import pipeline`
    # from train.py should cost nothing before the work starts.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
