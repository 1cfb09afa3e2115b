"""Per-element feed-forward networks with n2p2's activation functions and weight-file order.

A network is a list of layers ``(W, b)`` with ``W`` of shape (n_in, n_out) and ``b`` of shape (n_out,);
layer l computes y = f_l(x @ W + b) (divided by n_in before f_l when n2p2's ``normalize_nodes`` is on).
n2p2's ``weights.NNN.data`` lists, layer by layer, every weight a(l-1, j -> l, k) with j outer and k inner,
then the layer's biases: :func:`flatten` and :func:`unflatten` use exactly that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlmd_lab.errors import MLMDError

#: n2p2's one-letter activation codes.
ACTIVATIONS = {
    "l": "identity",
    "t": "tanh",
    "s": "logistic",
    "p": "softplus",
    "r": "relu",
    "g": "gaussian",
    "c": "cos",
    "S": "revlogistic",
    "e": "exp",
    "h": "harmonic",
}


def activation(code: str):
    """The JAX function of an n2p2 activation code."""
    functions = {
        "l": lambda x: x,
        "t": jnp.tanh,
        "s": jax.nn.sigmoid,
        "p": jax.nn.softplus,
        "r": jax.nn.relu,
        "g": lambda x: jnp.exp(-0.5 * x * x),
        "c": jnp.cos,
        "S": lambda x: 1.0 - jax.nn.sigmoid(x),
        "e": lambda x: jnp.exp(-x),
        "h": lambda x: x * x,
    }
    if code not in functions:
        raise MLMDError(f"unknown n2p2 activation {code!r}; use one of {ACTIVATIONS}")
    return functions[code]


Layers = list[tuple[np.ndarray, np.ndarray]]


def layer_sizes(n_inputs: int, hidden: Sequence[int]) -> list[int]:
    """Neuron counts from input to the single output neuron."""
    return [int(n_inputs), *(int(h) for h in hidden), 1]


def n_connections(sizes: Sequence[int]) -> int:
    """Number of weights plus biases of a network with these layer sizes."""
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def flatten(layers: Layers) -> np.ndarray:
    """All connections in n2p2's weight-file order (per layer: weights j-major, then biases)."""
    parts = []
    for W, b in layers:
        parts.append(np.asarray(W, dtype=np.float64).reshape(-1))
        parts.append(np.asarray(b, dtype=np.float64).reshape(-1))
    return np.concatenate(parts)


def unflatten(values: np.ndarray, sizes: Sequence[int]) -> Layers:
    """Inverse of :func:`flatten`."""
    values = np.asarray(values, dtype=np.float64)
    if values.size != n_connections(sizes):
        raise MLMDError(
            f"network with layers {list(sizes)} needs {n_connections(sizes)} connections, the file has {values.size}"
        )
    layers, at = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        W = values[at : at + n_in * n_out].reshape(n_in, n_out)
        at += n_in * n_out
        b = values[at : at + n_out]
        at += n_out
        layers.append((W.copy(), b.copy()))
    return layers


def init_layers(sizes: Sequence[int], rng: np.random.Generator, activations: str) -> Layers:
    """Random connections: Glorot/Bengio-uniform weights scaled for the activation, zero biases.

    The output layer starts at zero weight so that a fresh network predicts the mean energy
    (the normalisation keys carry it); this is n2p2's ``MS_ZEROOUTPUTWEIGHTS``-like safe start.
    """
    layers = []
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        limit = np.sqrt(6.0 / (n_in + n_out))
        if activations[index] in "sS":
            limit *= 4.0
        W = rng.uniform(-limit, limit, size=(n_in, n_out))
        if index == len(sizes) - 2:
            W *= 0.0
        layers.append((W, np.zeros(n_out)))
    return layers


def apply(layers, x, activations: str, normalize_nodes: bool = False):
    """Network output for inputs ``x`` of shape (..., n_in); returns shape (...)."""
    for (W, b), code in zip(layers, activations, strict=True):
        z = x @ W + b
        if normalize_nodes:
            z = z / W.shape[0]
        x = activation(code)(z)
    return x[..., 0]
