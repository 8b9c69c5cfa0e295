"""Preallocated buffers and bound step programs of one network (the compiled step).

:class:`Workspace` holds, for one :class:`~pipeline.engine.mlp.MLP` and one batch size,
every array a training step writes, and the step itself as a *program*: the list of every
numpy call of the forward pass, the output gradient and the backward pass, each bound once
to its arrays (:mod:`pipeline.fast.kernels`). The numbers are the engine's
(:func:`pipeline.engine.mlp.forward_pass`, :func:`~pipeline.engine.mlp.backward_pass`) up
to floating-point rounding; ``tests/fast`` holds them to it.

The memory of workspaces comes from :func:`arena` (aligned column-major arrays carved out
of one block), and the blocks of workspaces that are gone wait in a pool for the next one
of the same size (:class:`_SpareBlocks`, :func:`release_spare_memory`).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from pipeline.engine.losses import Loss
from pipeline.engine.mlp import MLP
from pipeline.fast.kernels import (
    backward_program,
    const,
    delta_program,
    forward_program,
)

Array = np.ndarray

__all__ = [
    "FOLD_BLOCK_ELEMENTS", "RULES_WITHOUT_Z", "Workspace", "arena", "assign", "packed_blocks",
    "packed_order", "release_spare_memory", "spare_blocks",
]


class Workspace:
    """Preallocated forward and backward buffers of one :class:`MLP` for ``n``-row batches.

    Layout: units-major. Every ``(n, w)`` buffer is column-major, which is the row-major
    ``(w, n)`` array of its transpose, and the products run on those transposes through
    ``np.dot`` (half the call cost of ``np.matmul`` on small shapes; ``np.dot`` wants a
    row-major ``out``). Each unit's values are then contiguous: elementwise passes, the
    column calls of a narrow softmax and the ones column below run at full speed.

    Biases are folded into the products: every layer's input is kept with a trailing
    column of ones, ``[A_{l-1}, 1]``, so ``Z_l = [A_{l-1}, 1] @ [W_l; b_l]`` adds the bias
    inside the product, and ``[A_{l-1}, 1].T @ delta_l`` gives ``dW_l`` and ``db_l`` in one
    product. In column-major order the first ``fan_in`` columns of ``[A_{l-1}, 1]`` are a
    contiguous array, so ``A_{l-1}`` is written there directly. ``[W_l; b_l]`` is packed
    per step (and the gradient unpacked) with slice assignments, a tenth of a microsecond
    each on small layers where a broadcast bias add costs 1.4 us (64 x 32) to 4 us
    (256 x 64), and a saving of two passes per layer on long batches.

    A step runs as a *program*: the list of every numpy call of the forward pass, the
    output gradient and the backward pass, each bound once to its arrays and constants
    (positional arguments, no keyword parsing) when the workspace is built. On small
    batches a step costs its number of calls and the Python around them, so running a
    flat list of bound calls saves the loops, branches and lookups of walking the layers.

    Attributes
    ----------
    Z : list of arrays
        Pre-activations ``Z_l``, shape ``(n, sizes[l])``, ``l = 1..L``; a hidden relu
        layer is computed in place, so after :meth:`forward` its ``Z_l`` holds ``A_l``.
    A : list of arrays
        ``A[0]`` is the input of the last :meth:`forward`; ``A[l] = f_l(Z_l)``
        (the same array as ``Z[l-1]`` for an identity layer).
    G : list of arrays
        ``G[l-1] = dLoss/dZ_l`` after a gradient step (built with the first one). On long
        batches a hidden layer's ``G`` lives in a buffer of the forward pass that is dead
        by the time it is written (see :meth:`_grad_homes`), so after a gradient step the
        hidden layers' ``Z`` and ``A`` may hold gradients: run :meth:`forward` to read
        them (the output layer's ``Z`` and ``A`` are never reused).
    """

    def __init__(self, model: MLP, n: int) -> None:
        self.n = n
        # Biases folded into the products, always: packing [W; b] costs two slice
        # assignments (0.1-0.3 us) where the bias add it replaces costs 1.4 us on 64 x 32
        # and more on larger layers.
        self.fold = model.bias
        sizes, acts, dt = model.sizes, model.activations, model.dtype
        # The model's parts, not the model: a workspace held by its model must not hold
        # it back (a reference cycle would keep large buffers alive until a gc pass).
        self.sizes, self.acts, self.dtype = sizes, acts, dt
        self.weights, self.biases = model.weights, model.biases
        self.grad_weights, self.grad_biases = model.grad_weights, model.grad_biases
        widths = sizes[1:]
        L = len(widths)
        extra = 1 if self.fold else 0
        # Inputs of every layer, then the outputs that are not a later layer's input.
        shapes = [fan_in + extra for fan_in in sizes[:-1]]
        own = [i for i, act in enumerate(acts)
               if i == L - 1 or act.name not in ("identity", "relu")]
        out_identity = acts[-1].name == "identity"
        shapes += [widths[i] for i in own] + ([] if out_identity else [widths[-1]])
        bufs = arena(self, n, shapes, dt)
        self.Ain = bufs[:L]
        if self.fold:
            for a, fan_in in zip(self.Ain, sizes[:-1], strict=True):
                a[:, fan_in] = 1.0
        spare = iter(bufs[L:])
        self.Z, self.A = [], [None]
        for i, w in enumerate(widths):
            # A hidden relu layer runs in place (A_l is Z_l): its derivative needs only
            # the sign of z, which relu(z) keeps, and on long batches every buffer saved
            # is a pass of first-touch page faults (100 MB per 256-unit layer at 100,000
            # rows).
            a = self.Ain[i + 1][:, :w] if i < L - 1 else None
            z = next(spare) if i in own else a
            if i == L - 1:
                a = z if out_identity else next(spare)
            self.Z.append(z)
            self.A.append(a)
        self.x_in = self.Ain[0][:, : sizes[0]]
        self.forward_ops = self._forward_ops()
        self.G = None  # the backward buffers and program, built with the first step
        self._backward = None

    def _forward_ops(self, blocks: list[Array] | None = None) -> list:
        """The forward pass's calls; ``blocks``: read ``[W_l; b_l]`` from these arrays
        (views of a packed parameter vector, see :func:`packed_blocks`) instead of packing
        them from the model's parameters every step."""
        dot, ops = np.dot, []
        biases = self.biases if self.biases is not None else [None] * len(self.weights)
        for i, (W, b, act) in enumerate(zip(self.weights, biases, self.acts, strict=True)):
            AinT, Z = self.Ain[i].T, self.Z[i]
            if self.fold:
                if blocks is None:
                    Wb = np.empty((W.shape[0] + 1, W.shape[1]), dtype=W.dtype)
                    ops += [assign(Wb[:-1], W), assign(Wb[-1], b)]
                else:
                    Wb = blocks[i]
                ops.append(partial(dot, Wb.T, AinT, Z.T))
            else:
                ops.append(partial(dot, W.T, AinT[: W.shape[0]], Z.T))
                if b is not None:
                    ops.append(partial(np.add, Z.T, b[:, None], Z.T))
            if act.name != "identity":
                ops += forward_program(act, Z, self.A[i + 1])
        return ops

    def _grad_buffers(self) -> None:
        """The backward buffers: :attr:`G`, the targets and the rules' scratch."""
        n, widths = self.n, self.sizes[1:]
        # The hidden layers' backward rules run one at a time on one scratch, each a
        # contiguous view of its start; on long batches they run on column blocks small
        # enough for the cache (about 1 MB: the mask and the product then never make a
        # round trip to memory, 22 -> 12 ms for relu on 100,000 x 256), sharing a
        # block-sized scratch.
        cols = max(1, FOLD_BLOCK_ELEMENTS // n)
        scratch_cols = min(cols, max(widths[:-1], default=0))
        homes = self._grad_homes()
        own = [k for k, home in enumerate(homes) if home is None]
        bufs = arena(self, n, [*(widths[k] for k in own), widths[-1], scratch_cols],
                      self.dtype)
        self.G = homes
        for k, buf in zip(own, bufs, strict=False):
            self.G[k] = buf
        self.t_in, self.scratch = bufs[-2], bufs[-1]

    def _grad_homes(self) -> list[Array | None]:
        """For each layer, the forward buffer its ``G`` is written into, or None for a
        buffer of its own.

        On long batches every buffer saved is a pass of first-touch page faults on a
        fresh process (about 2 ms per MB on the test VM: 0.2 s for one 100,000 x 256
        float32 layer). The backward step of layer ``l`` (top down) computes
        ``dW_l = [A_{l-1}, 1]^T G_l`` and then ``G_{l-1} = (G_l W_l^T) * f'(Z_{l-1})``,
        so while ``G_{l-1}`` is written only ``G_l``, the mask's ``Z_{l-1}`` and
        ``A_{l-1}`` and the inputs of lower layers are live. Every hidden buffer above is
        dead: ``A_j`` (``j >= l``: its product ``dW_{j+1}`` and its mask are done), a
        hidden ``Z_j`` of its own (``j >= l``), except the one holding ``G_l``. So a
        hidden layer's ``G`` goes, when its rule runs blocked (long batches):

        - for a relu layer under a one-unit layer (the outer product ``G_l w_l^T`` is
          made block by block), over its own values ``A = Z``: each block's mask is taken
          from ``A`` before ``G`` is written over it (:func:`_blocked_relu_in_place`);
        - for an identity layer (no mask), over its own values ``A = Z``;
        - for a tanh or sigmoid layer, over its own ``Z``: their rules read only ``A``
          (:data:`RULES_WITHOUT_Z`), so the product above and the rule write ``G``
          where ``Z`` was;
        - otherwise into a dead buffer above, when one is wide enough (never an ``A``'s
          ones column: only the ``A_j`` views, which stop before it).

        The output layer's buffers are never used: the loss value is read from them after
        the step. Where the product ``G_l W_l^T`` is a full matrix product, ``G_{l-1}``
        cannot be written over the mask's own operand: blocking that product by rows or
        columns to make room cost 20-60% more on 100,000 x 256 x 256 (measured), more
        than the faults it saves.
        """
        n, widths, acts = self.n, self.sizes[1:], self.acts
        L = len(widths)
        homes: list[Array | None] = [None] * L
        for k in reversed(range(L - 1)):
            if n * widths[k] <= FOLD_BLOCK_ELEMENTS:
                continue
            name = acts[k].name
            if name == "identity" or (name == "relu" and widths[k + 1] == 1):
                # Z[k] is A[k + 1] for both (in place); dead once dW_{k+1} is made.
                assert self.Z[k] is self.A[k + 1]
                homes[k] = self.Z[k]
                continue
            if name in RULES_WITHOUT_Z:
                # Z[k] is the layer's own, read by nothing after the forward pass.
                assert self.Z[k] is not self.A[k + 1]
                homes[k] = self.Z[k]
                continue
            # Dead while G[k] is written (the step of layer k + 1): the hidden A above,
            # the hidden Z of their own from layer k + 1 up; G[k + 1]'s home is read.
            dead = [self.A[j] for j in range(k + 2, L)]
            dead += [self.Z[j] for j in range(k + 1, L - 1) if self.Z[j] is not self.A[j + 1]]
            live = homes[k + 1]
            for buf in dead:
                if buf.shape[1] >= widths[k] and (live is None
                                                  or not np.shares_memory(buf, live)):
                    homes[k] = buf[:, : widths[k]]
                    break
        return homes

    def _backward_ops(self, blocks: list[Array] | None = None,
                      grad_blocks: list[Array] | None = None) -> list:
        """The backward pass's calls; with ``blocks`` the weights are read from the packed
        blocks and ``[dW_l; db_l]`` written into ``grad_blocks`` (no unpacking)."""
        if self.G is None:
            self._grad_buffers()
        n, dt, dot, scratch = self.n, self.dtype, np.dot, self.scratch
        widths, acts = self.sizes[1:], self.acts
        gbiases = self.grad_biases or [None] * len(widths)
        ops = []
        for i in reversed(range(len(widths))):
            W, G, dW, db = self.weights[i], self.G[i], self.grad_weights[i], gbiases[i]
            AinT = self.Ain[i].T
            if blocks is not None:
                W = blocks[i][:-1]
                ops.append(partial(dot, AinT, G, grad_blocks[i]))
            elif self.fold:
                dWb = np.empty((W.shape[0] + 1, W.shape[1]), dtype=dt)
                ops += [partial(dot, AinT, G, dWb), assign(dW, dWb[:-1]),
                        assign(db, dWb[-1])]
            else:
                ops.append(partial(dot, AinT[: W.shape[0]], G, dW))
                if db is not None:
                    # A product with a ones vector: several times faster than G.sum(axis=0).
                    ops.append(partial(dot, np.ones(n, dtype=dt), G, db))
            if i == 0:
                continue
            act, G_prev = acts[i - 1], self.G[i - 1]
            Z_prev, A_prev = self.Z[i - 1], self.A[i]
            rule = act.name != "identity"
            if rule and n * W.shape[0] > FOLD_BLOCK_ELEMENTS:
                outer = (G, W[:, 0]) if W.shape[1] == 1 else None
                if act.name == "relu" and G_prev is Z_prev:
                    # A relu layer under a one-unit layer: G over its values (_grad_homes).
                    assert outer is not None and Z_prev is A_prev
                    ops.append(_blocked_relu_in_place(A_prev, scratch, outer))
                    continue
                if outer is None:
                    ops.append(partial(dot, W, G.T, G_prev.T))
                # Block by block; a one-unit layer's outer product G_l w_l^T is made per
                # block too, so that each block is still in the cache when the rule
                # multiplies it.
                ops.append(_blocked_rule(act, Z_prev, A_prev, G_prev, scratch, outer))
                continue
            ops.append(partial(dot, W, G.T, G_prev.T))
            if rule:
                w = W.shape[0]
                S = scratch.reshape(-1, order="F")[: n * w].reshape((n, w), order="F")
                ops += backward_program(act, Z_prev, A_prev, G_prev, S)
        return ops

    def forward(self, X: Array) -> None:
        """Run the forward pass on ``X`` (``n`` rows) into ``Z`` and ``A``."""
        self.A[0] = X
        self.x_in[...] = X
        for op in self.forward_ops:
            op()

    def _delta_ops(self, loss: Loss) -> list:
        if self.G is None:
            self._grad_buffers()
        return delta_program(loss, self.acts[-1], self.Z[-1], self.A[-1], self.t_in,
                             self.G[-1])

    def train_program(self, loss: Loss, update: list,
                      packed: tuple[Array, Array] | None = None,
                      observe: Callable[[], object] | None = None,
                      ) -> Callable[[Array, Array], None]:
        """``run(X, T)``: one training step on ``n``-row batches as one list of bound calls.

        The forward pass, the output gradient and the backward pass followed by the
        optimiser's ``update`` calls. With ``packed=(P, dP)`` (a model with biases only)
        the step reads the parameters from the packed working copy
        ``P = params[packed_order(model)]`` and writes the gradient into ``dP`` in the same
        order, leaving ``params`` and ``grad`` alone. ``observe``, if given, is called
        between the forward and the backward pass (the output and hidden values are then
        those of the batch).
        """
        seen = [] if observe is None else [observe]
        if packed is None:
            if self._backward is None:
                self._backward = self._backward_ops()
            ops = [*self.forward_ops, *seen, *self._delta_ops(loss), *self._backward, *update]
        else:
            blocks, grad_blocks = (packed_blocks(a, self.sizes) for a in packed)
            ops = [*self._forward_ops(blocks), *seen, *self._delta_ops(loss),
                   *self._backward_ops(blocks, grad_blocks), *update]
        x_in, t_in = self.x_in, self.t_in

        def run(X: Array, T: Array) -> None:
            x_in[...] = X
            t_in[...] = T
            for op in ops:
                op()

        return run


FOLD_BLOCK_ELEMENTS = 2**18

# Hidden activations whose backward rule reads only the output ``a``, never ``z`` (tanh:
# 1 - a^2, sigmoid: a (1 - a)): on long batches their G is written over their own Z
# (see Workspace._grad_homes). tests/fast/test_fastpath.py holds every name here to it.
RULES_WITHOUT_Z = frozenset({"tanh", "sigmoid"})


def arena(owner: object, n: int, widths: Sequence[int], dtype: np.dtype) -> list[Array]:
    """Column-major ``(n, w)`` arrays for ``widths``, carved out of one block of memory.

    The block is ``owner``'s until ``owner`` is garbage; then it waits in
    :data:`spare_blocks` for the next workspace of the same size (see there). Each
    array starts on a 64-byte boundary.
    """
    align = 64 // np.dtype(dtype).itemsize
    sizes = [-(-n * w // align) * align for w in widths]
    block = spare_blocks.take(sum(sizes) + align, dtype, owner)
    offset = (-block.ctypes.data // block.itemsize) % align
    out = []
    for w, size in zip(widths, sizes, strict=True):
        out.append(block[offset : offset + n * w].reshape((n, w), order="F"))
        offset += size
    return out


class _SpareBlocks:
    """Memory blocks of workspaces that are gone, kept for the next one of the same size.

    glibc maps every block above its threshold afresh (and unmaps it when freed), so each
    new model paid the first-touch page faults of its workspaces again: 1.5 ms for the
    final evaluation of configuration 3 (10,000 rows of 32-unit layers, 2.8 MB), a
    third of an epoch's matrix products. A run that builds models one after another (a
    sweep, cross-validation, a benchmark) now reuses warm memory. At most ``max_bytes``
    wait here (the oldest go first); a block in use is never here, since it only comes
    back when its workspace, which holds every view of it, has been collected.

    Large blocks are kept too: on a virtual machine that hands freed memory back to its
    host, touching fresh memory costs far more than zeroing it (about 2 ms per MB on the
    2-core test machine, so 0.85 s for the 413 MB workspace of 100,000 rows of 256-unit
    layers, 0.6 s for the 312 MB it takes since the gradients of the hidden layers live in
    dead forward buffers, against 0.07 s when the memory was freed a moment ago).
    :func:`release_spare_memory` gives it all back.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.free: list[Array] = []
        self.pending: list[Array] = []  # given back while the lock was held
        self.lock = threading.Lock()

    def take(self, size: int, dtype: np.dtype, owner: object) -> Array:
        dtype = np.dtype(dtype)
        block = None
        with self.lock:
            while self.pending:
                self.free.append(self.pending.pop(0))
            self._trim()
            for i, spare in enumerate(self.free):
                if spare.size == size and spare.dtype == dtype:
                    block = self.free.pop(i)
                    break
        if block is None:
            block = np.empty(size, dtype=dtype)
        if block.nbytes <= self.max_bytes:
            weakref.finalize(owner, self.give_back, block).atexit = False
        return block

    def give_back(self, block: Array) -> None:
        # A finalizer: the cyclic garbage collector runs it whenever an allocation starts
        # a collection, also inside take() on this very thread (a workspace in a
        # reference cycle, e.g. held by an exception's traceback). Waiting for the lock
        # there deadlocked; the block then waits for the next take() instead.
        if not self.lock.acquire(blocking=False):
            self.pending.append(block)
            return
        try:
            self.free.append(block)
            self._trim()
        finally:
            self.lock.release()

    def _trim(self) -> None:
        while sum(b.nbytes for b in self.free) > self.max_bytes:
            self.free.pop(0)


def _spare_limit() -> int:
    """Memory kept for later workspaces: 1/16 of the machine's RAM, at most 1 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not a POSIX system
        ram = 8 << 30
    return int(min(1 << 30, ram // 16))


spare_blocks = _SpareBlocks(_spare_limit())  # the pool of every workspace


def release_spare_memory() -> None:
    """Free the memory kept from the workspaces of models that are gone."""
    with spare_blocks.lock:
        spare_blocks.free.clear()
        spare_blocks.pending.clear()


def packed_order(model: MLP) -> Array:
    """The permutation that packs ``model.params`` (or ``grad``) layer by layer.

    ``params[packed_order(model)]`` holds, for each layer, ``[W_l; b_l]`` as one
    row-major ``(fan_in + 1, fan_out)`` block (see :func:`packed_blocks`): the trainer's
    working copy, whose blocks the folded products read (and write, for the gradient)
    in place of packing and unpacking them every step.
    """
    parts, w_offset, b_offset = [], 0, model.n_weight_params
    for fan_in, fan_out in zip(model.sizes[:-1], model.sizes[1:], strict=True):
        parts += [np.arange(w_offset, w_offset + fan_in * fan_out),
                  np.arange(b_offset, b_offset + fan_out)]
        w_offset += fan_in * fan_out
        b_offset += fan_out
    return np.concatenate(parts)


def packed_blocks(flat: Array, sizes: Sequence[int]) -> list[Array]:
    """The ``[W_l; b_l]`` blocks of a packed vector (see :func:`packed_order`), as views."""
    blocks, offset = [], 0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        size = (fan_in + 1) * fan_out
        blocks.append(flat[offset : offset + size].reshape(fan_in + 1, fan_out))
        offset += size
    return blocks


def assign(dst: Array, src: Array):
    """``dst[...] = src`` as an argument-free call (a slice assignment costs less than
    ``np.copyto``: 0.16 vs 0.34 us for 32 values)."""
    setitem = dst.__setitem__

    def assign() -> None:
        setitem(Ellipsis, src)

    return assign


def _blocked_rule(act, Z: Array, A: Array, G: Array, scratch: Array, outer=None):
    """``act``'s backward kernel as a closure over column blocks of column-major arrays.

    With ``outer=(g, w)`` each block of ``G`` is first set to ``g * w`` (the outer
    product of a one-unit layer's delta ``g`` of shape ``(n, 1)`` and its weights ``w``).
    """
    cols = scratch.shape[1]
    blocks = []
    for j in range(0, Z.shape[1], cols):
        z, a, g = Z[:, j : j + cols], A[:, j : j + cols], G[:, j : j + cols]
        s = scratch[:, : min(cols, Z.shape[1] - j)]
        w = None if outer is None else outer[1][j : j + cols]
        blocks.append((g, w, backward_program(act, z, a, g, s)))
    multiply = np.multiply
    g_out = None if outer is None else outer[0]

    def run_blocks() -> None:
        for g, w, ops in blocks:
            if w is not None:
                multiply(g_out, w, out=g)
            for op in ops:
                op()

    return run_blocks


def _blocked_relu_in_place(A: Array, scratch: Array, outer: tuple[Array, Array]):
    """``G = (g w^T) * (A > 0)`` written over ``A`` (a relu layer's values, ``A = Z``)
    block by block, as a closure.

    ``outer=(g, w)``: the delta ``g`` of shape ``(n, 1)`` of the one-unit layer above and
    its weights ``w``. Each block's mask is taken from ``A`` (``relu(z) > 0`` exactly
    where ``z > 0``, NaN included) before ``G`` is written over it; the outer product
    goes to the scratch. The same three passes over a cached block, and the same
    numbers, as :func:`_blocked_rule` with a ``G`` of its own.
    """
    cols = scratch.shape[1]
    g_out, w = outer
    blocks = [(A[:, j : j + cols], scratch[:, : min(cols, A.shape[1] - j)], w[j : j + cols])
              for j in range(0, A.shape[1], cols)]
    greater, multiply, zero = np.greater, np.multiply, const(0.0, A.dtype)

    def run() -> None:
        for a, s, wj in blocks:
            greater(a, zero, a)
            multiply(g_out, wj, s)
            multiply(a, s, a)

    return run
