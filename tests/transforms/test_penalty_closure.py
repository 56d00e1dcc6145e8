"""Penalties under ``optimizer.step(closure)`` (PyTorch Lightning's automatic optimization,
LBFGS): the closure zeroes the gradients and runs the backward inside the step, so the penalty
gradient must land after it, on every evaluation. Each test compares with the same model trained
with the penalty written as an explicit loss term and no regfx."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import regfx

STEPS = 3
ATOL = 1e-5
L1, L2 = 1e-3, 5e-2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def explicit_penalty(model: nn.Module, l1: float, l2: float) -> torch.Tensor:
    ws = [model[0].weight, model[3].weight]  # what regfx penalizes by default
    return l1 * sum(w.abs().sum() for w in ws) + (l2 / 2) * sum((w * w).sum() for w in ws)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    if name == "lbfgs":
        return torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=5)
    assert name == "lbfgs-wolfe"
    return torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=4, history_size=5,
                             line_search_fn="strong_wolfe")


def pair(l1: float, l2: float) -> tuple[nn.Module, nn.Module]:
    """(regfx-transformed model, deep copy of the same untransformed model)."""
    base = make_model()
    reference = copy.deepcopy(base)
    return regfx.transform(base, l1=l1, l2=l2), reference


def train_with_closure(model: nn.Module, opt_name: str, explicit: tuple[float, float] | None,
                       evaluations: list[int] | None = None) -> nn.Module:
    """``opt.step(closure)`` with the closure Lightning's automatic optimization builds:
    zero_grad, forward, backward, return the loss. ``explicit``: the penalty as a loss term."""
    opt = make_optimizer(opt_name, model)
    for x, y in batches():
        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if explicit is not None:
                loss = loss + explicit_penalty(model, *explicit)
            loss.backward()
            if evaluations is not None:
                evaluations.append(1)
            return loss

        opt.step(closure)
    return model


def assert_same_parameters(model: nn.Module, reference: nn.Module) -> None:
    ref = dict(reference.named_parameters())
    # regfx's penalty adds no parameter, so the names match
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref[name], rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize(("l1", "l2"), [(0.0, L2), (L1, L2)])
def test_step_with_closure_equals_explicit_loss_term(opt_name: str, l1: float, l2: float) -> None:
    hooked, reference = pair(l1, l2)
    train_with_closure(reference, opt_name, explicit=(l1, l2))
    train_with_closure(hooked, opt_name, explicit=None)
    assert_same_parameters(hooked, reference)


@pytest.mark.parametrize("opt_name", ["lbfgs", "lbfgs-wolfe"])
@pytest.mark.parametrize(("l1", "l2"), [(0.0, L2), (L1, L2)])
def test_lbfgs_every_closure_evaluation_sees_the_penalty(opt_name: str, l1: float,
                                                         l2: float) -> None:
    """LBFGS evaluates the closure several times per step; the strong-Wolfe line search also
    compares the losses the closure returns, so they must include the penalty value."""
    hooked, reference = pair(l1, l2)
    ref_evals: list[int] = []
    hooked_evals: list[int] = []
    train_with_closure(reference, opt_name, explicit=(l1, l2), evaluations=ref_evals)
    train_with_closure(hooked, opt_name, explicit=None, evaluations=hooked_evals)
    assert len(ref_evals) > STEPS  # several evaluations per step, so the test means something
    assert len(hooked_evals) == len(ref_evals)
    assert_same_parameters(hooked, reference)


def test_closure_returns_the_loss_plus_the_penalty_value() -> None:
    model = regfx.transform(make_model(), l1=L1, l2=L2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    seen: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        seen.append(loss.detach())
        return loss

    expected_penalty = regfx.penalty(model).detach()
    returned = opt.step(closure)
    assert isinstance(returned, torch.Tensor)
    torch.testing.assert_close(returned.detach(), seen[0] + expected_penalty)
    # a closure returning a float gets a float back; None stays None
    assert opt.step(lambda: None) is None
    expected = 1.0 + float(regfx.penalty(model).detach())  # the weights before the step
    value = opt.step(lambda: 1.0)
    assert isinstance(value, float)
    assert value == pytest.approx(expected, rel=1e-6)


class LightningStyleClosure:
    """What Lightning's automatic optimization passes to the optimizer, without Lightning: a
    callable object whose ``__call__`` runs zero_grad, forward (training_step), backward and
    returns the loss; the loop reads the step's loss from the object, not from ``step``."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Any, Any],
                 explicit: tuple[float, float] | None) -> None:
        self.model, self.opt, self.batch, self.explicit = model, opt, batch, explicit
        self.result: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        self.opt.zero_grad()
        x, y = self.batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        if self.explicit is not None:
            loss = loss + explicit_penalty(self.model, *self.explicit)
        loss.backward()
        self.result = loss.detach()
        return loss


def precision_wrap_closure(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Lightning's precision plugin wraps the closure (and runs its after-closure hooks)."""
    return closure()


def train_lightning_style(model: nn.Module, explicit: tuple[float, float] | None) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    logged = []
    for batch in batches():
        closure = LightningStyleClosure(model, opt, batch, explicit)
        # Lightning calls optimizer.step(closure=partial(precision._wrap_closure, ...))
        opt.step(closure=functools.partial(precision_wrap_closure, closure))
        assert closure.result is not None
        logged.append(float(closure.result))
    return logged


def test_lightning_style_loop_equals_explicit_loss_term() -> None:
    hooked, reference = pair(L1, L2)
    train_lightning_style(reference, explicit=(L1, L2))
    logged = train_lightning_style(hooked, explicit=None)
    assert_same_parameters(hooked, reference)
    # what the loop logs is the user's loss: regfx does not touch the closure's own result
    plain = make_model()
    x, y = batches(1)[0]
    first_loss = float(nn.functional.cross_entropy(plain(x), y).detach())
    assert logged[0] == pytest.approx(first_loss, rel=1e-6)


def test_lightning_style_closure_without_penalty_is_not_wrapped() -> None:
    """An optimizer over a model with no regfx penalty gets its closure untouched."""
    model = make_model()
    reference = copy.deepcopy(model)
    train_lightning_style(model, explicit=None)
    train_lightning_style(reference, explicit=None)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_no_closure_path_still_equals_explicit_loss_term(opt_name: str) -> None:
    hooked, reference = pair(L1, L2)
    for model, explicit in ((reference, True), (hooked, False)):
        opt = make_optimizer(opt_name, model)
        for x, y in batches():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if explicit:
                loss = loss + explicit_penalty(model, L1, L2)
            loss.backward()
            opt.step()
    assert_same_parameters(hooked, reference)


@pytest.mark.parametrize("opt_name", ["sgd", "lbfgs"])
def test_closure_penalty_changes_training(opt_name: str) -> None:
    """The bug this file guards against: with a closure the penalty was erased by the closure's
    zero_grad, and the parameters ended bit-identical to an l2=0 run."""
    plain = train_with_closure(make_model(), opt_name, explicit=None)
    hooked = train_with_closure(regfx.transform(make_model(), l2=0.05), opt_name, explicit=None)
    assert not torch.allclose(plain[0].weight, hooked[0].weight, rtol=0, atol=1e-4)
    assert not torch.allclose(plain[3].weight, hooked[3].weight, rtol=0, atol=1e-4)


def clip(model: nn.Module) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)


def test_loop_clipping_happens_before_the_penalty() -> None:
    """Clipping in the loop, between backward and step, clips the loss gradient only."""
    hooked, reference = pair(0.0, L2)
    for model, explicit in ((reference, True), (hooked, False)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in batches():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            clip(model)
            if explicit:
                explicit_penalty(model, 0.0, L2).backward()
            opt.step()
    assert_same_parameters(hooked, reference)


@pytest.mark.parametrize("scaler", [False, True])
def test_clipping_as_the_optimizers_own_pre_hook_sees_the_penalty(scaler: bool) -> None:
    """The documented way to clip loss + penalty: register the clip as the optimizer's own step
    pre-hook; those run after global ones such as regfx's, so it sees the penalty gradient (and,
    under GradScaler, after ``scaler.step`` has unscaled the gradients)."""
    hooked, reference = pair(0.0, L2)
    for model, explicit in ((reference, True), (hooked, False)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaler)
        if not explicit:
            opt.register_step_pre_hook(lambda opt, args, kwargs, model=model: clip(model))
        for x, y in batches():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if explicit:
                loss = loss + explicit_penalty(model, 0.0, L2)
                loss.backward()
                clip(model)
                opt.step()
            else:
                grad_scaler.scale(loss).backward()
                grad_scaler.step(opt)
                grad_scaler.update()
    assert_same_parameters(hooked, reference)
    # and the clip mattered: without it the weights differ
    unclipped = make_model()
    opt = torch.optim.SGD(unclipped.parameters(), lr=0.1)
    for x, y in batches():
        opt.zero_grad()
        (nn.functional.cross_entropy(unclipped(x), y)
         + explicit_penalty(unclipped, 0.0, L2)).backward()
        opt.step()
    assert not torch.allclose(unclipped[0].weight, hooked[0].weight, rtol=0, atol=1e-4)


def test_clipping_inside_a_closure_happens_before_the_penalty() -> None:
    """Lightning clips in its precision plugin's closure wrapper, so the penalty (added after
    the closure returns) is not clipped; the documented alternative, the term written into the
    loss with no regfx penalty attached, is clipped with the loss."""

    def run(model: nn.Module, explicit_in_loss: bool, penalty_after_clip: bool) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in batches():
            def wrapped(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                if explicit_in_loss:
                    loss = loss + explicit_penalty(model, 0.0, L2)
                loss.backward()
                clip(model)  # Precision._after_closure -> _clip_gradients
                if penalty_after_clip:
                    explicit_penalty(model, 0.0, L2).backward()
                return loss

            opt.step(closure=wrapped)

    hooked, reference = pair(0.0, L2)
    run(hooked, explicit_in_loss=False, penalty_after_clip=False)
    run(reference, explicit_in_loss=False, penalty_after_clip=True)
    assert_same_parameters(hooked, reference)

    # the term written into the loss by hand, regfx without l1/l2: clipped together
    by_hand = regfx.transform(make_model(), dropout=0.0)
    assert float(regfx.penalty(by_hand)) == 0.0
    clipped_together = make_model()
    run(by_hand, explicit_in_loss=True, penalty_after_clip=False)
    run(clipped_together, explicit_in_loss=True, penalty_after_clip=False)
    assert_same_parameters(by_hand, clipped_together)
    assert not torch.allclose(by_hand[0].weight, hooked[0].weight, rtol=0, atol=1e-4)
