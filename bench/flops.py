"""Analytic matmul FLOP counts of a stack's forward pass and of the backward a map needs.

Per layer with input size ``in``, ``G`` gate blocks of width ``H``, batch ``B``, ``T`` steps, a
multiply-add counted as 2 FLOPs:

* forward: input projection ``2 B T in G H`` plus recurrent ``2 B T H G H``;
* backward of a hidden map (no weight gradients): the input-gradient matmuls only, recurrent
  ``2 B T G H H`` (``dz @ U^T``) plus ``2 B T G H in`` (``dz @ W^T``) for every layer whose
  input is differentiated (layers above 0; the data is not);
* weight gradients (a params map or ``jax.grad`` w.r.t. the parameters): another
  ``2 B T (in + H) G H`` per layer.

Element-wise work (gates, tanh) is O(B T G H) per layer, below 1% of the matmuls at ``H = 128``
and not counted.
"""
from __future__ import annotations


def gate_blocks(cell_name: str) -> int:
    """``G``: gate blocks of width ``H`` per weight matrix for the cells benchmarked."""
    return {"lstm": 4, "gru": 3, "rnn": 1, "star": 2, "mgu": 2}[cell_name]


def layer_inputs(layers: int, input_size: int, hidden: int) -> list[int]:
    return [input_size] + [hidden] * (layers - 1)


def forward(layers, steps, hidden, batch, input_size, gates) -> int:
    """Matmul FLOPs of one forward pass of the stack."""
    return sum(2 * batch * steps * gates * hidden * (i + hidden)
               for i in layer_inputs(layers, input_size, hidden))


def backward_inputs(layers, steps, hidden, batch, input_size, gates) -> int:
    """Matmul FLOPs of the backward pass w.r.t. states only (a hidden/Jacobian map's VJP)."""
    return sum(2 * batch * steps * gates * hidden * (hidden + (i if l > 0 else 0))
               for l, i in enumerate(layer_inputs(layers, input_size, hidden)))


def backward_weights(layers, steps, hidden, batch, input_size, gates) -> int:
    """Matmul FLOPs of the weight gradients (``x^T dz`` and ``h^T dz``)."""
    return forward(layers, steps, hidden, batch, input_size, gates)


def hidden_map(layers, steps, hidden, batch, input_size, gates) -> int:
    """Forward plus the state-only backward: what ``gradient_map(wrt="hidden")`` needs."""
    return (forward(layers, steps, hidden, batch, input_size, gates)
            + backward_inputs(layers, steps, hidden, batch, input_size, gates))
