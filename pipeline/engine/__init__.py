"""The math of a multi-layer perceptron, written to be read: numpy and the standard library only.

Start at :mod:`pipeline.engine.mlp` (the forward and backward pass), then
:mod:`~pipeline.engine.activations` and :mod:`~pipeline.engine.losses` (each function
beside its derivative), :mod:`~pipeline.engine.optim` and :mod:`~pipeline.engine.loop`
(the training loop). :mod:`~pipeline.engine.gradcheck` and
:mod:`~pipeline.engine.autodiff` are the two independent checks of the gradients.
"""
