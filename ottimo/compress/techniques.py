"""Compression in PyTorch: global magnitude pruning, structured pruning that really shrinks the matrices,
knowledge distillation, and the fine-tuning loop they share.

Models are `ottimo.models.family.build` Sequentials (InputNorm, the family's network) of any family. Structured
pruning goes through torch-pruning's dependency graph, so it needs no knowledge of the architecture; its result is
no longer what the recipe builds, so it goes on as its ONNX file (and a state_dict kept for the record).
"""

from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from ottimo.data.tables import Splits
from ottimo.models.family import Recipe, build
from ottimo.models.train import OPTIMIZERS
from ottimo.spec import InputSpec

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
    """(module, parameter name) of every weight matrix: Linear and convolution weights and attention's packed
    in-projection."""
    out: list[tuple[nn.Module, str]] = []
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
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


class NotPrunable(ValueError):
    """Structured pruning found nothing it could remove from the model (the candidate is skipped with this)."""


def _kept_layers(model: nn.Module, n_classes: int) -> list[nn.Module]:
    """What structured pruning leaves whole: the classifier's outputs (the last layer with n_classes outputs),
    attention (its packed heads) and embeddings (the token vocabulary and width they share with the residual)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d) and
            getattr(m, "out_features", getattr(m, "out_channels", None)) == n_classes][-1:]
    return last + [m for m in model.modules() if isinstance(m, nn.MultiheadAttention | nn.Embedding)]


def structured_prune(model: nn.Sequential, spec: InputSpec, n_classes: int, ratio: float) -> nn.Sequential:
    """A copy without the `ratio` fraction of channels of every prunable group whose producing weights have the
    lowest L2 norm (group_reduction "first": what the layer that makes a channel holds for it): torch-pruning's
    dependency graph removes a hidden neuron, a conv channel or a feed-forward unit from every layer it touches,
    so matrices really shrink (no zeros). Any family's model works; raises NotPrunable when nothing could go."""
    model = copy.deepcopy(model).eval()
    example = torch.ones(2, *spec.shape, dtype=getattr(torch, spec.dtype))
    before = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():  # torch-pruning warns about layers it leaves alone: the reason below says it
        warnings.simplefilter("ignore")
        try:
            importance = tp.importance.MagnitudeImportance(p=2, group_reduction="first")
            pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio,
                                          ignored_layers=_kept_layers(model, n_classes))
            pruner.step()
        except Exception as err:  # the graph tracer meets whatever a user's module does
            raise NotPrunable(f"torch-pruning cannot trace this model ({type(err).__name__}: {err})") from None
    after = sum(p.numel() for p in model.parameters())
    if after >= before:
        raise NotPrunable("no channel or neuron can be removed: every layer is an output, attention or embedding")
    return model


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
    X, y = torch.from_numpy(splits.rows(splits.X_train)), torch.from_numpy(splits.y_train)
    Xv = splits.rows(splits.X_val)
    soft = None
    if teacher is not None:
        with torch.no_grad():
            soft = teacher.eval()(X)
    optim = OPTIMIZERS[spec.optimizer](model.parameters(), spec.lr, 0.0)
    gen = torch.Generator().manual_seed(spec.seed)
    best_acc, best_state = accuracy(model, Xv, splits.y_val), copy.deepcopy(model.state_dict())
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
        acc = accuracy(model, Xv, splits.y_val)
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def new_student(recipe: Recipe, splits: Splits, seed: int) -> nn.Sequential:
    """A freshly initialised (seeded) student built by `recipe` with its InputNorm fitted on the train split."""
    with _SEED_LOCK:
        torch.manual_seed(seed)
        model = build(recipe, splits.input, len(splits.labels))
    model[0].fit(torch.from_numpy(splits.rows(splits.X_train)))
    return model


def distill(teacher: nn.Module, splits: Splits, recipe: Recipe, spec: FinetuneSpec, temperature: float,
            alpha: float) -> nn.Sequential:
    """Train a new student (any family: `recipe`) on the teacher's softened logits."""
    student = new_student(recipe, splits, spec.seed)
    return finetune(student, splits, spec, teacher=teacher, temperature=temperature, alpha=alpha)
