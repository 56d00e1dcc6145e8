"""Penalty semantics: the update equals adding l1*sum|w| + (l2/2)*sum w^2 to the loss once per
optimizer step, compared with an explicit-loss training loop."""

import copy
from typing import Any

import pytest
import torch
from torch import nn

import regfx
from regfx.transforms.penalty import penalized_parameters


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


L1, L2 = 1e-3, 5e-2


def explicit_penalty(model: nn.Module) -> torch.Tensor:
    ws = [model[0].weight, model[3].weight]
    return L1 * sum(w.abs().sum() for w in ws) + (L2 / 2) * sum((w * w).sum() for w in ws)


def train(model: nn.Module, opt_name: str, explicit: bool, accumulate: int = 1,
          autocast: bool = False, steps: int = 5) -> nn.Module:
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    data = batches(steps * accumulate)
    for step in range(steps):
        opt.zero_grad()
        for micro in range(accumulate):
            x, y = data[step * accumulate + micro]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.cross_entropy(model(x).float(), y) / accumulate
            loss.backward()
        if explicit:  # once per optimizer step, as the contract says
            explicit_penalty(model).backward()
        opt.step()
    return model


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize(("accumulate", "autocast"), [(1, False), (4, False), (1, True)])
def test_update_equals_explicit_loss(opt_name: str, accumulate: int, autocast: bool) -> None:
    reference = train(make_model(), opt_name, explicit=True, accumulate=accumulate,
                      autocast=autocast)
    hooked = regfx.transform(make_model(), l1=L1, l2=L2)
    train(hooked, opt_name, explicit=False, accumulate=accumulate, autocast=autocast)
    ref_sd = reference.state_dict()
    for key, value in hooked.state_dict().items():
        torch.testing.assert_close(value, ref_sd[key], rtol=0, atol=1e-6, msg=key)


def test_penalty_changes_training_at_all() -> None:
    plain = train(make_model(), "sgd", explicit=False)
    hooked = train(regfx.transform(make_model(), l1=L1, l2=L2), "sgd", explicit=False)
    assert not torch.allclose(plain[0].weight, hooked[0].weight)
    # biases and norm parameters are not penalized by default
    assert penalized_parameters(hooked)["names"] == ["0.weight", "3.weight"]


def test_grad_scaler_skips_on_overflow_and_unscales() -> None:
    model = regfx.transform(make_model(), l2=L2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = batches(1)[0]
    for m, o, explicit in ((model, opt, False), (ref, ref_opt, True)):
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        if explicit:
            loss = loss + (L2 / 2) * sum((w * w).sum() for w in (m[0].weight, m[3].weight))
        if m is model:
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
        else:
            loss.backward()
            o.step()
    torch.testing.assert_close(model[0].weight, ref[0].weight, rtol=0, atol=1e-6)


def test_penalty_value_matches_formula_and_is_differentiable() -> None:
    model = regfx.transform(make_model(), l1=L1, l2=L2)
    value = regfx.penalty(model)
    torch.testing.assert_close(value, explicit_penalty(model))
    value.backward()
    assert model[0].weight.grad is not None
    assert float(regfx.penalty(make_model())) == 0.0


def test_penalty_survives_deepcopy_and_bake_removes_it() -> None:
    model = regfx.transform(make_model(), l2=L2)
    clone = copy.deepcopy(model)
    ref = make_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ref(x), y)
        (loss + (L2 / 2) * sum((w * w).sum() for w in (ref[0].weight, ref[3].weight))).backward()
        opt.step()
    train(clone, "sgd", explicit=False, steps=3)
    torch.testing.assert_close(clone[0].weight, ref[0].weight, rtol=0, atol=1e-6)
    baked = regfx.bake(model)
    assert float(regfx.penalty(baked)) == 0.0


def test_penalty_on_normalized_weight_targets_the_original() -> None:
    model = regfx.transform(make_model(), spectral="linear", l2=L2)
    state = penalized_parameters(model)
    assert state["names"] == ["0.weight", "3.weight"]
    params = state["params"]
    assert params[0] is model[0].parametrizations.weight.original


def test_frozen_parameters_are_not_penalized() -> None:
    model = make_model()
    model[0].weight.requires_grad_(False)
    out = regfx.transform(model, l2=L2)
    assert len(penalized_parameters(out)["params"]) == 1


def test_penalties_cover_rnn_and_attention_weights_against_an_explicit_loss_term() -> None:
    """LSTM and MultiheadAttention keep their weights as weight_ih_l0 / in_proj_weight: the
    penalty covers every weight-like parameter (never biases) and matches the loss term."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 6, num_layers=2, batch_first=True)
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(x)
            a, _ = self.attn(h, h, h)
            return self.head(a.mean(1))

    model = Net()
    plan = regfx.plan(model, l2=0.1, penalty_on="rnn,attention")
    assert plan.penalty is not None
    assert set(plan.penalty.params) == {
        "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1",
        "attn.in_proj_weight", "attn.out_proj.weight"}
    reference = copy.deepcopy(model)
    out = regfx.transform(model, l2=0.1, penalty_on="rnn,attention")
    x, y = torch.randn(3, 5, 4), torch.randn(3, 2)
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    named = dict(reference.named_parameters())
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(out(x), y).backward()
        opt.step()
        ref_opt.zero_grad()
        loss = nn.functional.mse_loss(reference(x), y)
        loss = loss + 0.05 * sum((named[n] ** 2).sum() for n in plan.penalty.params)
        loss.backward()
        ref_opt.step()
    for name, p in out.named_parameters():
        torch.testing.assert_close(p, named[name], rtol=1e-5, atol=1e-6)
    report = regfx.audit(Net())
    flagged = {f.target for f in report.findings if f.code == "RFX401"}
    assert {"rnn.weight_ih_l0", "attn.in_proj_weight", "attn.out_proj.weight"} <= flagged
    assert "rnn.bias_ih_l0" not in flagged


def test_a_penalty_selecting_nothing_warns_and_fails_under_strict() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.warns(regfx.RegfxWarning, match="selects no weight"):
        regfx.transform(model, l2=0.1, penalty_on="embedding", exclude=["0"])
    with pytest.raises(regfx.RegfxError, match="selects no weight"):
        regfx.transform(model, l2=0.1, penalty_on="embedding", exclude=["0"], strict=True)


def explicit_train(model: nn.Module, l1: float = L1, l2: float = L2, steps: int = 3) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ws = [model[0].weight, model[3].weight]
    for x, y in batches(steps):
        opt.zero_grad()
        term = l1 * sum(w.abs().sum() for w in ws) + (l2 / 2) * sum((w * w).sum() for w in ws)
        (nn.functional.cross_entropy(model(x), y) + term).backward()
        opt.step()
    return model


def test_penalty_follows_parameters_replaced_after_transform() -> None:
    """load_state_dict(assign=True) (like fully_shard, to_empty...) puts new tensors in the
    model; the penalty applies to the tensors the model holds when the optimizer steps."""
    hooked = regfx.transform(make_model(), l1=L1, l2=L2)
    fresh = {k: v.clone() for k, v in make_model().state_dict().items()}
    hooked.load_state_dict(fresh, assign=True)
    assert hooked[0].weight is not None and all(
        hooked[0].weight is not p for p in make_model().parameters())
    train(hooked, "sgd", explicit=False, steps=3)
    reference = explicit_train(make_model())
    for key, value in hooked.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], rtol=0, atol=1e-6, msg=key)


def test_a_parameter_unfrozen_during_training_is_penalized_from_then_on() -> None:
    model = make_model()
    model[0].weight.requires_grad_(False)
    hooked = regfx.transform(model, l2=L2)
    opt = torch.optim.SGD(hooked.parameters(), lr=0.1)
    x, y = batches(1)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(hooked(x), y).backward()
    opt.step()  # frozen: no gradient, no penalty, no update
    hooked[0].weight.requires_grad_(True)
    before = hooked[0].weight.detach().clone()
    opt.zero_grad()
    nn.functional.cross_entropy(hooked(x), y).backward()
    data_grad = hooked[0].weight.grad.clone()  # type: ignore[union-attr]
    opt.step()
    torch.testing.assert_close(hooked[0].weight, before - 0.1 * (data_grad + L2 * before))


def global_hooks() -> int:
    from torch.optim import optimizer as optim_module

    return len(optim_module._global_optimizer_pre_hooks)


def test_each_model_owns_its_hook_and_removing_the_penalty_removes_it() -> None:
    import gc

    gc.collect()
    before = global_hooks()
    model = regfx.transform(make_model(), l2=L2)
    assert global_hooks() == before + 1
    clone = copy.deepcopy(model)  # a state and a hook of its own
    assert global_hooks() == before + 2
    regfx.bake(model)  # the baked copy's hook is removed with its penalty
    assert global_hooks() == before + 2
    del model
    gc.collect()
    assert global_hooks() == before + 1
    # the copy still trains with its penalty, bound to its own parameters
    train(clone, "sgd", explicit=False, steps=3)
    reference = explicit_train(make_model(), l1=0.0)
    torch.testing.assert_close(clone[0].weight, reference[0].weight, rtol=0, atol=1e-6)
    regfx.transform(clone, dropout=0.0, l2=0.0, inplace=True)  # another recipe: no penalty
    assert global_hooks() == before
    assert float(regfx.penalty(clone)) == 0.0


def test_two_penalized_models_in_one_closure_each_get_their_penalty_once() -> None:
    """One optimizer over two transformed models, stepped with a closure, and an optimizer
    whose step calls another's with the same closure: every penalty is added exactly once per
    closure evaluation."""
    a = regfx.transform(make_model(), l2=L2)
    b = regfx.transform(make_model(), l1=L1)
    ref_a, ref_b = make_model(), make_model()

    class Outer(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            return super().step(closure)

    def run(models: tuple[nn.Module, nn.Module], explicit: bool) -> None:
        opt = Outer([p for m in models for p in m.parameters()], lr=0.1)
        for x, y in batches(3):
            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = sum(nn.functional.cross_entropy(m(x), y) for m in models)
                if explicit:
                    wa = (models[0][0].weight, models[0][3].weight)
                    wb = (models[1][0].weight, models[1][3].weight)
                    loss = loss + (L2 / 2) * sum((w * w).sum() for w in wa)
                    loss = loss + L1 * sum(w.abs().sum() for w in wb)
                loss.backward()  # type: ignore[union-attr]
                return loss  # type: ignore[return-value]

            opt.step(closure)

    run((a, b), explicit=False)
    run((ref_a, ref_b), explicit=True)
    for got, want in ((a, ref_a), (b, ref_b)):
        for key, value in got.state_dict().items():
            torch.testing.assert_close(value, want.state_dict()[key], rtol=0, atol=1e-6, msg=key)
