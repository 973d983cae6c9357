"""Structured (channel) pruning with torch-pruning, then a short fine-tune to recover accuracy.

Whole output channels are removed from convolutions, together with every layer that depends on
them (batch norms, the next convolution's input channels, concatenations), so the network is
really smaller and faster on every engine, unlike unstructured sparsity which only CPUs with
sparse kernels could exploit. The final classifier keeps its outputs: they are the classes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from onboard.runtime.errors import CompileError


def output_layers(model: Any, example: Any) -> list[Any]:
    """The convolution or linear layers whose output is the model's output (the classifier).

    Found by tracing which module produced the tensor the model returns, so it works for any
    architecture without naming conventions.
    """
    import torch

    produced: dict[int, Any] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d | torch.nn.Linear):
            hooks.append(module.register_forward_hook(
                lambda m, _inp, out: produced.__setitem__(id(out), m)))
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for hook in hooks:
            hook.remove()
    outputs = out if isinstance(out, tuple | list) else [out]
    layers = [produced[id(o)] for o in outputs if id(o) in produced]
    if not layers:
        # The output went through an activation or upsampling after the classifier: ignore
        # every layer with as many outputs as the model has output channels, last first.
        channels = outputs[0].shape[1]
        for module in reversed(list(model.modules())):
            if getattr(module, "out_channels", getattr(module, "out_features", None)) == channels:
                layers.append(module)
                break
    return layers


def prune_channels(model: Any, example: Any, ratio: float, ignored: Iterable[Any] = (),
                   round_to: int | None = None) -> Any:
    """Remove ``ratio`` of the channels of every prunable layer group by L2 magnitude.

    ``ratio`` is torch-pruning's ``pruning_ratio``: 0.5 removes half the channels of each layer,
    which removes about three quarters of a conv net's MACs (both input and output channels of
    inner layers shrink). The model is changed in place and returned.
    """
    import torch
    import torch_pruning as tp

    if not 0.0 <= ratio < 1.0:
        raise CompileError(f"--prune must be in [0, 1), got {ratio}")
    model.eval()
    ignored_layers = list(ignored) + output_layers(model, example)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored_layers,
        round_to=round_to,
    )
    pruner.step()
    with torch.no_grad():
        model(example)  # fails here, not later in export, if pruning broke the graph
    return model


def fine_tune(model: Any, batches: Any, loss_fn: Any, epochs: int, lr: float = 1e-3,
              seed: int = 0, threads: int = 2, label: str = "fine-tune") -> Any:
    """Train ``model`` for ``epochs`` passes over ``batches`` with the model's own loss.

    ``batches`` is a callable returning an iterable of (x, y) numpy batches (the zoo's
    ``train_batches`` bound to its data root), called once per epoch. Adam at a small learning
    rate: after pruning the remaining weights are already good and only need to re-balance.
    """
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for x, y in batches():
            optimizer.zero_grad()
            out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            loss = loss_fn(out, torch.from_numpy(np.asarray(y)))
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
        if count == 0:
            raise CompileError(f"{label}: the model's training data yielded no batches")
        print(f"[compile] {label} epoch {epoch + 1}/{epochs}: loss {total / count:.4f}",
              file=sys.stderr, flush=True)
    model.eval()
    return model
