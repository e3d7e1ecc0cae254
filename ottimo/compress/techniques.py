"""Compression in PyTorch: global magnitude pruning, structured neuron pruning that really shrinks the matrices,
knowledge distillation, and the fine-tuning loop they share.

Models are `build_model` Sequentials (Standardize, MLP | PatchTransformer). Structured pruning removes the same
fraction of neurons from every hidden layer (MLP) or feed-forward block (transformer), so the result is again a
`build_model` architecture described by a TrainCfg patch (`hidden` or `ff_dim`).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from ottimo.data.tables import Splits
from ottimo.models.architectures import MLP, PatchTransformer, build_model
from ottimo.models.train import OPTIMIZERS

_SEED_LOCK = threading.Lock()  # torch's global RNG is shared by threads: seed + init under one lock


@dataclass(frozen=True)
class FinetuneSpec:
    """How a compressed model is trained: epochs, learning rate, batch size, optimizer seed for shuffling."""

    epochs: int
    lr: float
    batch_size: int = 64
    seed: int = 42
    optimizer: str = "adamw"


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight matrix: Linear weights and attention's packed in-projection."""
    out: list[tuple[nn.Module, str]] = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            out.append((m, "weight"))
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            out.append((m, "in_proj_weight"))
    return out


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the weight matrices (biases and norms excluded)."""
    weights = [getattr(m, name).detach() for m, name in prunable(model)]
    return float(sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights))


def magnitude_prune(model: nn.Module, amount: float) -> nn.Module:
    """Zero the `amount` fraction of smallest-|w| weights over all matrices together (global, unstructured).
    The masks stay attached (re-applied on every forward) until `make_permanent`."""
    prune.global_unstructured(prunable(model), pruning_method=prune.L1Unstructured, amount=amount)
    return model


def refresh_masks(model: nn.Module) -> None:
    """Recompute every pruned weight as orig * mask. torch re-applies a mask when the module's forward runs, but
    attention reads `out_proj.weight` without calling out_proj, which would reuse a stale (freed) graph."""
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                hook(m, None)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold pruning masks into the weights so the state_dict and the ONNX export are plain tensors."""
    for m, name in prunable(model):
        if prune.is_pruned(m) and hasattr(m, f"{name}_mask"):
            prune.remove(m, name)
    return model


def _keep(weight_rows: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (sorted) of the rows with the largest L2 norm, keeping (1 - ratio) of them, at least one."""
    n = weight_rows.shape[0]
    k = max(1, int(round(n * (1 - ratio))))
    return torch.sort(weight_rows.norm(dim=1).topk(k).indices).values


def _slice_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def structured_prune(model: nn.Sequential, ratio: float) -> tuple[nn.Sequential, dict]:
    """A copy without the `ratio` fraction of lowest-norm neurons of each MLP hidden layer or transformer
    feed-forward block (rows of one matrix, columns of the next): smaller matrices, not zeros.
    Returns it and the TrainCfg patch that rebuilds its architecture."""
    model = copy.deepcopy(model)
    net = model[1]
    if isinstance(net, MLP):
        linears = [i for i, m in enumerate(net.net) if isinstance(m, nn.Linear)]
        for a, b in zip(linears, linears[1:], strict=False):
            keep = _keep(net.net[a].weight.detach(), ratio)
            net.net[a] = _slice_linear(net.net[a], rows=keep)
            net.net[b] = _slice_linear(net.net[b], cols=keep)
        return model, {"mlp": {"hidden": [net.net[i].out_features for i in linears[:-1]]}}
    if isinstance(net, PatchTransformer):
        for layer in net.encoder.layers:
            keep = _keep(layer.linear1.weight.detach(), ratio)
            layer.linear1 = _slice_linear(layer.linear1, rows=keep)
            layer.linear2 = _slice_linear(layer.linear2, cols=keep)
        return model, {"transformer": {"ff_dim": net.encoder.layers[0].linear1.out_features}}
    raise TypeError(f"structured pruning supports MLP and PatchTransformer, not {type(net).__name__}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y) (Hinton et al., 2015):
    the soft targets carry the teacher's similarities between classes; T^2 keeps their gradient scale."""
    soft = nn.functional.kl_div(nn.functional.log_softmax(student_logits / temperature, dim=1),
                                nn.functional.log_softmax(teacher_logits / temperature, dim=1),
                                reduction="batchmean", log_target=True)
    hard = nn.functional.cross_entropy(student_logits, y)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


@torch.no_grad()
def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    return float((model(torch.from_numpy(X)).argmax(dim=1).numpy() == y).mean())


def finetune(model: nn.Module, splits: Splits, spec: FinetuneSpec, teacher: nn.Module | None = None,
             temperature: float = 4.0, alpha: float = 0.5) -> nn.Module:
    """Train `model` for `spec.epochs` (cross-entropy, or distillation from `teacher`); keep the weights of the
    best validation accuracy. Dropout stays off and shuffling uses its own generator, so runs in parallel
    threads stay deterministic. Pruning masks, if attached, keep pruned weights at zero."""
    X, y = torch.from_numpy(splits.X_train), torch.from_numpy(splits.y_train)
    soft = None
    if teacher is not None:
        with torch.no_grad():
            soft = teacher.eval()(X)
    optim = OPTIMIZERS[spec.optimizer](model.parameters(), spec.lr, 0.0)
    gen = torch.Generator().manual_seed(spec.seed)
    best_acc, best_state = accuracy(model, splits.X_val, splits.y_val), copy.deepcopy(model.state_dict())
    for _ in range(spec.epochs):
        model.eval()  # eval mode: no dropout; the models have no batch norm
        for idx in torch.randperm(len(X), generator=gen).split(spec.batch_size):
            optim.zero_grad()
            refresh_masks(model)
            logits = model(X[idx])
            loss = (nn.functional.cross_entropy(logits, y[idx]) if soft is None
                    else distillation_loss(logits, soft[idx], y[idx], temperature, alpha))
            loss.backward()
            optim.step()
        acc = accuracy(model, splits.X_val, splits.y_val)
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def new_student(family: str, splits: Splits, cfg, seed: int) -> nn.Sequential:
    """A freshly initialised (seeded) student of `family` with its Standardize fitted on the train split."""
    with _SEED_LOCK:
        torch.manual_seed(seed)
        model = build_model(family, splits.X_train.shape[1], len(splits.labels), cfg)
    model[0].fit(torch.from_numpy(splits.X_train))
    return model


def distill(teacher: nn.Module, splits: Splits, family: str, cfg, spec: FinetuneSpec, temperature: float,
            alpha: float) -> nn.Sequential:
    """Train a new `family` student (architecture from TrainCfg `cfg`) on the teacher's softened logits."""
    student = new_student(family, splits, cfg, spec.seed)
    return finetune(student, splits, spec, teacher=teacher, temperature=temperature, alpha=alpha)
