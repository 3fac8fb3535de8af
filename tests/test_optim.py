"""Functional optimizers, gradient clipping and schedules against torch.optim / transformers."""

import math
import re

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ftprog.core import _tree
from ftprog.core._optim import (AdamW, AdamWState, SGDState, adamw, clip_by_global_norm, constant, cosine, linear,
                                load_state_dict, schedule_by_name, sgd, state_dict)

SHAPES = {"model.embed.weight": (37, 16), "model.layers.0.proj.weight": (16, 16), "model.layers.0.proj.bias": (16,),
          "model.norm.weight": (7,), "model.scale": (), "lm_head.weight": (81, 129)}  # > 8192 elements


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}


def make_grads(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    return {k: (torch.randn(s, generator=g) * (0.1 + step)).to(dtype) for k, s in SHAPES.items()}


def torch_run(opt_cls, params, steps, *, scheduler=None, round_to=None, grad_dtype=None, **kw):
    """Run a torch.optim optimizer on copies of ``params`` with make_grads(step) as gradients.

    ``round_to``: params (and grads) are rounded to that dtype after every step;
    ``grad_dtype``: grads are made in that dtype, then cast to the params'.
    """
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = opt_cls(ps.values(), **kw)
    sched = scheduler(opt) if scheduler else None
    for step in range(steps):
        for k, p in ps.items():
            p.grad = make_grads(step, round_to or grad_dtype or torch.float32)[k].to(p.dtype)
        opt.step()
        if sched:
            sched.step()
        if round_to is not None:  # no master weights: params live in round_to between steps
            with torch.no_grad():
                for p in ps.values():
                    p.copy_(p.to(round_to))
    return {k: p.detach() for k, p in ps.items()}


def ours_run(opt, params, steps, *, grad_dtype=None, inplace=False, state=None, start=0):
    state = opt.init(params) if state is None else state
    for step in range(start, start + steps):
        params, state = opt.update(make_grads(step, grad_dtype or next(iter(params.values())).dtype), state, params,
                                   inplace=inplace)
    return params, state


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), (k, (a[k].float() - b[k].float()).abs().max())


# --------------------------------------------------------------------------- AdamW


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_adamw_matches_torch_bitwise(fused, inplace):
    params = make_params()
    kw = dict(betas=(0.85, 0.99), eps=1e-7, weight_decay=0.1)
    ref = torch_run(torch.optim.AdamW, params, 6, lr=3e-2, foreach=not fused, fused=fused, **kw)
    ours, state = ours_run(adamw(3e-2, fused=fused, **kw), params, 6, inplace=inplace)
    assert_bitwise(ours, ref)
    assert state.count == 6 and all(v.dtype == torch.float32 for v in state.exp_avg.values())


def test_adamw_bf16_state_matches_torch_on_bf16_params():
    """state_dtype=bf16: moments stored in bf16, as torch.optim.AdamW keeps them for bf16 params."""
    params = make_params(torch.bfloat16)
    kw = dict(betas=(0.85, 0.99), eps=1e-7, weight_decay=0.1)
    ref = torch_run(torch.optim.AdamW, params, 6, lr=3e-2, fused=True, **kw)
    ours, state = ours_run(adamw(3e-2, fused=True, state_dtype="bfloat16", **kw), params, 6, inplace=True)
    assert_bitwise(ours, ref)
    assert all(v.dtype == torch.bfloat16 for v in (*state.exp_avg.values(), *state.exp_avg_sq.values()))
    # the state round-trips through state_dict / load_state_dict in its dtype
    opt = adamw(3e-2, fused=True, state_dtype=torch.bfloat16, **kw)
    loaded = load_state_dict(opt, ours, st_load(st_save({k: v.contiguous() for k, v in state_dict(state).items()})))
    assert_bitwise(loaded.exp_avg_sq, state.exp_avg_sq)
    with pytest.raises(ValueError, match="expected torch.float32"):
        load_state_dict(adamw(3e-2), ours, state_dict(state))  # fp32 state expected, bf16 saved
    with pytest.raises(ValueError, match="state_dtype must be a floating-point dtype"):
        adamw(1e-3, state_dtype=torch.int8)


def test_sgd_state_dtype():
    params = make_params(torch.bfloat16)
    ref = torch_run(torch.optim.SGD, params, 4, lr=1e-2, momentum=0.9, foreach=True)
    ours, state = ours_run(sgd(1e-2, momentum=0.9, state_dtype="bfloat16"), params, 4)
    assert all(v.dtype == torch.bfloat16 for v in state.momentum.values())
    assert_bitwise(ours, ref)


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_schedule_matches_torch_with_transformers_scheduler(fused):
    from transformers import get_cosine_schedule_with_warmup
    params = make_params()
    ref = torch_run(torch.optim.AdamW, params, 8, lr=1e-2, weight_decay=0.01, foreach=not fused, fused=fused,
                    scheduler=lambda o: get_cosine_schedule_with_warmup(o, 3, 8))
    opt = adamw(cosine(1e-2, total_steps=8, warmup_steps=3), weight_decay=0.01, fused=fused)
    ours, _ = ours_run(opt, params, 8)
    assert_bitwise(ours, ref)


def test_adamw_fused_and_foreach_agree():
    params = make_params()
    a, _ = ours_run(adamw(1e-2, weight_decay=0.1, fused=True), params, 5)
    b, _ = ours_run(adamw(1e-2, weight_decay=0.1, fused=False), params, 5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fused", [None, False])
def test_adamw_bf16_params_fp32_state(fused):
    params = make_params(torch.bfloat16)
    opt = adamw(1e-2, weight_decay=0.1, fused=fused)
    ours, state = ours_run(opt, params, 6)
    assert all(v.dtype == torch.bfloat16 for v in ours.values())
    assert all(v.dtype == torch.float32 for v in (*state.exp_avg.values(), *state.exp_avg_sq.values()))
    # Exactly torch.optim.AdamW on fp32 copies whose params are rounded to bf16 after every step.
    f32 = {k: v.float() for k, v in params.items()}
    emulated = torch_run(torch.optim.AdamW, f32, 6, lr=1e-2, weight_decay=0.1, round_to=torch.bfloat16,
                         foreach=fused is False, fused=fused is None)
    assert_bitwise(ours, {k: v.to(torch.bfloat16) for k, v in emulated.items()})
    # torch.optim.AdamW run on the bf16 params themselves (bf16 state, a rounding after every op) drifts
    # from us by at most about one bf16 ulp or one lr per step, and is further from the fp32 master-weight run.
    native = torch_run(torch.optim.AdamW, params, 6, lr=1e-2, weight_decay=0.1, round_to=torch.bfloat16)
    for k in ours:
        torch.testing.assert_close(ours[k].float(), native[k].float(), rtol=6 * 2**-7, atol=6 * 1e-2)
    truth = torch_run(torch.optim.AdamW, f32, 6, lr=1e-2, weight_decay=0.1, grad_dtype=torch.bfloat16)
    err = {name: sum((run[k].float() - truth[k]).abs().sum().item() for k in truth)
           for name, run in (("ours", ours), ("native", native))}
    assert err["ours"] < err["native"], err
    # The update really happened (not lost to rounding at this learning rate).
    assert any(not torch.equal(ours[k], params[k]) for k in ours)


@pytest.mark.parametrize("make_opt", [lambda: adamw(1e-2, weight_decay=0.1), lambda: adamw(1e-2, fused=False),
                                      lambda: sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01)])
@pytest.mark.parametrize("inplace", [False, True])
def test_bucketing_never_changes_results(monkeypatch, make_opt, inplace):
    """Small buckets (large tensors cut into flat ranges) give the same bits; so do fp32 params with bf16 grads."""
    from ftprog.core import _optim
    cases = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32, torch.float32)]
    ref = {c: ours_run(make_opt(), make_params(c[0]), 3, grad_dtype=c[1], inplace=inplace) for c in cases}
    monkeypatch.setattr(_optim, "_UPCAST_NUMEL", 100)  # lm_head goes in 3 flat pieces of 4096
    monkeypatch.setattr(_optim, "_BUCKET_NUMEL", 50)
    for c in cases:
        params, state = ours_run(make_opt(), make_params(c[0]), 3, grad_dtype=c[1], inplace=inplace)
        assert_bitwise(params, ref[c][0])
        assert_bitwise(state_dict(state), state_dict(ref[c][1]))
    # fp32 params, bf16 grads: the grads are upcast, exactly torch.optim on the upcast grads
    if isinstance(make_opt(), AdamW) and make_opt().fused is None:
        expected = torch_run(torch.optim.AdamW, make_params(), 3, lr=1e-2, weight_decay=0.1, fused=True,
                             grad_dtype=torch.bfloat16)
        assert_bitwise(ref[(torch.float32, torch.bfloat16)][0], expected)


def test_update_does_not_mutate_inputs_unless_inplace():
    params = make_params()
    before = {k: v.clone() for k, v in params.items()}
    grads = make_grads(0)
    grads_before = {k: v.clone() for k, v in grads.items()}
    for opt in (adamw(0.1, weight_decay=0.1, fused=True), adamw(0.1, weight_decay=0.1, fused=False),
                adamw(0.1), sgd(0.1, momentum=0.9, nesterov=True), sgd(0.1, weight_decay=0.1)):
        new, _ = opt.update(grads, opt.init(params), params)
        assert_bitwise(params, before)
        assert_bitwise(grads, grads_before)
        assert all(new[k] is not params[k] and not torch.equal(new[k], params[k]) for k in params if params[k].dim())
    bf16 = make_params(torch.bfloat16)
    bf16_before = {k: v.clone() for k, v in bf16.items()}
    new, _ = adamw(0.1).update(make_grads(0, torch.bfloat16), adamw(0.1).init(bf16), bf16)
    assert_bitwise(bf16, bf16_before)
    # params that require grad (autograd leaves) are fine too: no graph is recorded
    leaves = {k: v.clone().requires_grad_(True) for k, v in make_params().items()}
    new, _ = adamw(0.1).update(make_grads(0), adamw(0.1).init(leaves), leaves)
    assert not any(v.requires_grad for v in new.values())
    # inplace=True updates the given tensors and returns them.
    for p in (params, bf16):
        opt = adamw(0.1)
        functional, _ = opt.update(make_grads(0, p["model.scale"].dtype), opt.init(p), p)
        new, _ = opt.update(make_grads(0, p["model.scale"].dtype), opt.init(p), p, inplace=True)
        assert all(new[k] is p[k] for k in p)
        assert_bitwise(new, functional)


# --------------------------------------------------------------------------- SGD


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.0, False, 0.05), (0.9, False, 0.0),
                                                            (0.9, True, 0.0), (0.8, True, 0.05), (0.8, False, 0.05)])
@pytest.mark.parametrize("inplace", [False, True])
def test_sgd_matches_torch_bitwise(momentum, nesterov, weight_decay, inplace):
    params = make_params()
    ref = torch_run(torch.optim.SGD, params, 5, lr=0.05, momentum=momentum, nesterov=nesterov,
                    weight_decay=weight_decay, foreach=True)
    ours, state = ours_run(sgd(0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), params, 5,
                           inplace=inplace)
    assert_bitwise(ours, ref)
    assert state.count == 5 and (len(state.momentum) == (len(SHAPES) if momentum else 0))


def test_sgd_schedule_and_bf16():
    from transformers import get_linear_schedule_with_warmup
    params = make_params()
    ref = torch_run(torch.optim.SGD, params, 6, lr=0.05, momentum=0.9, foreach=True,
                    scheduler=lambda o: get_linear_schedule_with_warmup(o, 2, 6))
    ours, _ = ours_run(sgd(linear(0.05, 6, 2), momentum=0.9), params, 6)
    assert_bitwise(ours, ref)
    bf16 = make_params(torch.bfloat16)
    ours, state = ours_run(sgd(0.05, momentum=0.9, weight_decay=0.01), bf16, 4)
    emulated = torch_run(torch.optim.SGD, {k: v.float() for k, v in bf16.items()}, 4, lr=0.05, momentum=0.9,
                         weight_decay=0.01, foreach=True, round_to=torch.bfloat16)
    assert_bitwise(ours, {k: v.to(torch.bfloat16) for k, v in emulated.items()})
    assert all(v.dtype == torch.float32 for v in state.momentum.values())


# --------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_clip_matches_torch(max_norm):
    grads = make_grads(2)
    before = {k: v.clone() for k, v in grads.items()}
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=True)
    clipped, norm = clip_by_global_norm(grads, max_norm)
    assert norm.dtype == torch.float32 and norm.dim() == 0 and torch.equal(norm, ref_norm)
    assert_bitwise(clipped, {k: p.grad for k, p in zip(grads, ps)})
    assert_bitwise(grads, before)  # not mutated
    if max_norm > norm:
        assert_bitwise(clipped, grads)
    else:
        total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in clipped.values()]))
        assert abs(total.item() - max_norm) < 1e-5
    same, _ = clip_by_global_norm(before, max_norm, inplace=True)
    assert all(same[k] is before[k] for k in before) and all(torch.equal(same[k], clipped[k]) for k in same)


def test_clip_bf16_and_nonfinite():
    grads = make_grads(1, torch.bfloat16)
    clipped, norm = clip_by_global_norm(grads, 1.0)
    exact = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads.values()]))
    assert norm.dtype == torch.float32 and abs(norm.item() - exact.item()) < 1e-5 * exact.item()
    assert all(v.dtype == torch.bfloat16 for v in clipped.values())
    for bad in (float("inf"), float("nan")):
        g = make_grads(1)
        g["model.scale"] = torch.tensor(bad)
        _, norm = clip_by_global_norm(g, 1.0)
        assert not torch.isfinite(norm) and (math.isnan(bad) == bool(norm.isnan()))
    assert clip_by_global_norm({}, 1.0)[0] == {}
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm(grads, 0.0)


# --------------------------------------------------------------------------- schedules


def hf_lrs(factory, lr, steps, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = factory(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # no grads: a no-op that keeps LambdaLR from warning
        sched.step()
    return out


@pytest.mark.parametrize("total,warmup", [(10, 0), (10, 3), (7, 7), (1, 0)])
def test_schedules_match_transformers(total, warmup):
    import transformers as tf
    lr = 3e-4
    ours = {"constant": constant(lr, warmup), "linear": linear(lr, total, warmup), "cosine": cosine(lr, total, warmup)}
    refs = {"constant": hf_lrs(tf.get_constant_schedule_with_warmup, lr, total + 1, num_warmup_steps=warmup),
            "linear": hf_lrs(tf.get_linear_schedule_with_warmup, lr, total + 1, num_warmup_steps=warmup,
                             num_training_steps=total),
            "cosine": hf_lrs(tf.get_cosine_schedule_with_warmup, lr, total + 1, num_warmup_steps=warmup,
                             num_training_steps=total)}
    for name, fn in ours.items():
        assert [fn(s) for s in range(total + 1)] == refs[name], name
        assert [schedule_by_name(name, lr, total, warmup)(s) for s in range(total + 1)] == refs[name]
    # with a floor
    ref = hf_lrs(tf.get_cosine_with_min_lr_schedule_with_warmup, lr, total + 1, num_warmup_steps=warmup,
                 num_training_steps=total, min_lr=3e-5)
    assert [cosine(lr, total, warmup, final_lr=3e-5)(s) for s in range(total + 1)] == ref
    if warmup < total:  # (transformers divides by zero otherwise)
        ref = hf_lrs(tf.get_polynomial_decay_schedule_with_warmup, lr, total + 1, num_warmup_steps=warmup,
                     num_training_steps=total, lr_end=3e-5, power=1.0)
        assert [linear(lr, total, warmup, final_lr=3e-5)(s) for s in range(total + 1)] == pytest.approx(ref, rel=1e-12)
    # past the end they hold the final value
    assert cosine(lr, total, warmup, final_lr=3e-5)(total + 5) == pytest.approx(3e-5)
    assert linear(lr, total, warmup)(total + 5) == 0.0


def test_schedule_errors():
    with pytest.raises(ValueError, match="constant, cosine, linear"):
        schedule_by_name("exponential", 1e-3, 10)
    with pytest.raises(ValueError, match="lr"):
        cosine(-1e-3, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        linear(1e-3, 10, warmup_steps=11)
    with pytest.raises(ValueError, match="total_steps"):
        cosine(1e-3, 0)
    with pytest.raises(ValueError, match="final_lr"):
        cosine(1e-3, 10, final_lr=1e-2)
    with pytest.raises(ValueError, match="warmup_steps"):
        constant(1e-3, -1)


def test_stochastic_rounding_moves_small_updates_on_average():
    """An update under half a bf16 step: rounding to nearest drops it every time; stochastic rounding lands on
    one of the two bf16 neighbours with the probabilities that give the update in expectation."""
    n = 1 << 16
    params = {"a.weight": torch.ones(n, dtype=torch.bfloat16), "b.weight": torch.ones(n, dtype=torch.bfloat16)}
    grads = {k: torch.ones(n, dtype=torch.bfloat16) for k in params}
    lr = 1e-3  # bf16 steps below 1.0 are 2**-8: a 1e-3 update is a quarter of one
    nearest, _ = sgd(lr).update(grads, sgd(lr).init(params), params)
    assert all(torch.equal(v, params[k]) for k, v in nearest.items())
    opt = sgd(lr, stochastic_rounding=True)
    new, _ = opt.update(grads, opt.init(params), params)
    for v in new.values():
        assert set(v.float().unique().tolist()) == {1.0, 1.0 - 2**-8}
        assert v.float().mean().item() == pytest.approx(1.0 - lr, abs=5e-5)  # ~9 standard errors
    assert not torch.equal(new["a.weight"], new["b.weight"])  # each param draws its own bits
    again, _ = opt.update(grads, opt.init(params), params)
    assert_bitwise(again, new)  # the bits come from the step's number and the names: repeatable
    later, _ = opt.update(grads, SGDState(1, {}), params)
    assert not torch.equal(later["a.weight"], new["a.weight"])  # and change from step to step
    f32 = {k: v.float() for k, v in params.items()}
    assert_bitwise(opt.update({k: g.float() for k, g in grads.items()}, opt.init(f32), f32)[0],
                   sgd(lr).update({k: g.float() for k, g in grads.items()}, opt.init(f32), f32)[0])  # fp32: as is
    f16 = {k: v.half() for k, v in params.items()}  # fp16: rounded to nearest (the bit trick is bf16's)
    g16 = {k: g.half() for k, g in grads.items()}
    assert_bitwise(opt.update(g16, opt.init(f16), f16)[0], sgd(lr).update(g16, opt.init(f16), f16)[0])


def test_stochastic_rounding_keeps_bf16_moments_moving():
    """bf16 second moments rounded to nearest stop growing at 0.25 when fed grad = 1 (0.001 x 1 is under half a
    bf16 step of them); rounded stochastically they follow the fp32 value, 1 - 0.999**1000 = 0.632."""
    n = 1 << 14
    params = {"w": torch.zeros(n, dtype=torch.bfloat16)}
    grads = {"w": torch.ones(n, dtype=torch.bfloat16)}
    moments = {}
    for rounding in (False, True):
        opt = adamw(0.0, state_dtype="bfloat16", stochastic_rounding=rounding)
        state = opt.init(params)
        for _ in range(1000):
            _, state = opt.update(grads, state, params)
        moments[rounding] = state.exp_avg_sq["w"].float().mean().item()
    assert moments[False] == 0.25
    assert moments[True] == pytest.approx(1 - 0.999**1000, abs=0.01)


def test_stochastic_rounding_tracks_fp32_training():
    """AdamW on bf16 params at a small learning rate, gradients of one sign: params rounded to nearest lose most
    of the drift that the same run on fp32 params makes; rounded stochastically they keep it on average."""
    params = make_params(torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    grads = [{k: torch.rand(v.shape, generator=g).to(torch.bfloat16) for k, v in params.items()} for _ in range(30)]

    def drift(opt, ps):
        state = opt.init(ps)
        start = ps
        for gr in grads:
            ps, state = opt.update(gr, state, ps)
        return sum((ps[k].float() - start[k].float()).sum().item() for k in ps)

    truth = drift(adamw(1e-4), {k: v.float() for k, v in params.items()})
    assert truth == pytest.approx(-30e-4 * sum(v.numel() for v in params.values()), rel=0.2)  # ~lr a step
    assert abs(drift(adamw(1e-4), params) / truth - 1) > 0.5
    assert drift(adamw(1e-4, stochastic_rounding=True), params) / truth == pytest.approx(1, abs=0.05)


def test_stochastic_rounding_config_key_reaches_the_optimizer():
    from ftprog.programs.sft_config import OptimizerSection, SFTConfig
    from ftprog.programs.training import build_optimizer

    for name in ("adamw", "sgd"):
        for on in (False, True):
            cfg = SFTConfig(optimizer=OptimizerSection(name=name, stochastic_rounding=on))
            assert build_optimizer(cfg, 10).stochastic_rounding is on
    with pytest.raises(ValueError, match="stochastic_rounding must be True or False"):
        adamw(1e-3, stochastic_rounding=1)


def test_default_moments_are_bf16_for_full_bf16_fine_tuning_only():
    from ftprog.programs.sft_config import OptimizerSection, PeftSection, SFTConfig, optimizer_state_dtype
    from ftprog.programs.training import build_optimizer

    full = PeftSection(method="none")
    assert SFTConfig().optimizer.state_dtype == "auto" and SFTConfig().optimizer.stochastic_rounding
    assert optimizer_state_dtype(SFTConfig(peft=full, dtype="bf16")) == "bf16"
    assert build_optimizer(SFTConfig(peft=full, dtype="bf16"), 10).state_dtype == torch.bfloat16
    assert optimizer_state_dtype(SFTConfig(peft=full, dtype="fp32")) == "fp32"
    assert optimizer_state_dtype(SFTConfig(dtype="bf16")) == "fp32"  # LoRA: fp32 adapters, fp32 moments
    explicit = SFTConfig(peft=full, dtype="bf16", optimizer=OptimizerSection(state_dtype="fp32"))
    assert optimizer_state_dtype(explicit) == "fp32"


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("make_opt", [lambda: adamw(cosine(1e-2, 8, 2), weight_decay=0.1),
                                      lambda: adamw(1e-2, fused=False),
                                      lambda: adamw(1e-2, state_dtype="bfloat16", stochastic_rounding=True),
                                      lambda: sgd(linear(0.05, 8), momentum=0.9, nesterov=True),
                                      lambda: sgd(0.05, momentum=0.9, stochastic_rounding=True),
                                      lambda: sgd(0.05)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bitwise(make_opt, dtype):
    opt = make_opt()
    params = make_params(dtype)
    straight, straight_state = ours_run(opt, params, 8)
    half, state = ours_run(opt, params, 4)
    blob = st_save(state_dict(state))  # safetensors bytes: no pickle involved
    saved_params = st_save(dict(half))
    # a fresh process: new optimizer object, params and state from the bytes only
    opt2 = make_opt()
    params2 = st_load(saved_params)
    state2 = load_state_dict(opt2, params2, st_load(blob))
    assert type(state2) is type(state) and state2.count == 4
    resumed, resumed_state = ours_run(opt2, params2, 4, state=state2, start=4)
    assert_bitwise(resumed, straight)
    assert_bitwise(state_dict(resumed_state), state_dict(straight_state))
    d = state_dict(straight_state)
    assert d["count"].dtype == torch.int64 and d["count"].dim() == 0 and int(d["count"]) == 8


def test_load_state_dict_errors():
    params = make_params()
    opt = adamw(1e-3)
    d = state_dict(opt.init(params))
    with pytest.raises(ValueError, match="missing"):
        load_state_dict(opt, params, {k: v for k, v in d.items() if k != "exp_avg.model.scale"})
    with pytest.raises(ValueError, match="unexpected"):
        load_state_dict(opt, params, {**d, "momentum.model.scale": torch.zeros(())})
    with pytest.raises(ValueError, match="count"):
        load_state_dict(opt, params, {k: v for k, v in d.items() if k != "count"})
    with pytest.raises(ValueError, match="expected torch.float32"):
        load_state_dict(opt, params, {**d, "exp_avg.model.norm.weight": torch.zeros(8)})
    with pytest.raises(ValueError, match="unexpected"):  # SGD state into AdamW
        load_state_dict(opt, params, state_dict(sgd(0.1, momentum=0.9).init(params)))
    # update with a state or grads for other params
    with pytest.raises(ValueError, match="missing grads"):
        opt.update({k: v for k, v in make_grads(0).items() if k != "model.scale"}, opt.init(params), params)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.update(make_grads(0), opt.init({"x": torch.zeros(2)}), params)


# --------------------------------------------------------------------------- arguments and integration


def test_bad_arguments():
    for bad, message in [
        (dict(lr=-1e-3), "lr must be in [0, inf), got -0.001"),
        (dict(lr=float("nan")), "lr must be in [0, inf), got nan"),
        (dict(lr=1e-3, betas=(1.0, 0.999)), "betas[0] must be in [0, 1), got 1.0"),
        (dict(lr=1e-3, betas=(0.9, -0.1)), "betas[1] must be in [0, 1), got -0.1"),
        (dict(lr=1e-3, betas=(0.9,)), "betas must be a pair (beta1, beta2), got (0.9,)"),
        (dict(lr=1e-3, eps=-1.0), "eps must be in [0, inf), got -1.0"),
        (dict(lr=1e-3, weight_decay=-0.1), "weight_decay must be in [0, inf), got -0.1"),
        (dict(lr=1e-3, fused="yes"), "fused must be None, True or False, got 'yes'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            adamw(**bad)
    with pytest.raises(TypeError, match="lr must be a number, got str"):
        adamw("1e-3")
    for bad, message in [
        (dict(lr=-0.1), "lr must be in [0, inf), got -0.1"),
        (dict(lr=0.1, momentum=-0.5), "momentum must be in [0, 1], got -0.5"),
        (dict(lr=0.1, momentum=1.5), "momentum must be in [0, 1], got 1.5"),
        (dict(lr=0.1, nesterov=True), "nesterov=True needs momentum > 0"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay must be in [0, inf), got -1.0"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            sgd(**bad)
    params = make_params()
    opt = adamw(lambda step: -1.0)
    with pytest.raises(ValueError, match="schedule returned -1.0 at step 0"):
        opt.update(make_grads(0), opt.init(params), params)
    meta = {"w": torch.zeros(3, device="meta")}  # fused=True where torch has no kernel: a clear error
    opt = adamw(1e-3, fused=True)
    with pytest.raises(RuntimeError, match="fused AdamW is not available"):
        opt.update(meta, opt.init(meta), meta)
    assert isinstance(adamw(1e-3), AdamW) and isinstance(adamw(1e-3).init(params), AdamWState)
    assert isinstance(sgd(1e-3).init(params), SGDState)


def test_trains_a_tiny_model():
    from ftprog.core import from_config, value_and_grad
    model = from_config("tiny", seed=0)
    model = model.replace(trainable=frozenset(_tree.flatten(model.params)))
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def loss_fn(m, toks):
        logits = m(toks[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), toks[:, 1:].flatten())

    step = value_and_grad(loss_fn)
    opt = adamw(constant(3e-3, warmup_steps=1), weight_decay=0.01)
    params = model.trainable_params()
    state = opt.init(params)
    losses = []
    for _ in range(6):
        loss, grads = step(model, tokens)
        grads, _ = clip_by_global_norm(grads, 1.0)
        params, state = opt.update(grads, state, params)
        model = model.with_params(params)
        losses.append(loss.item())
    assert losses[-1] < losses[1] - 0.05, losses


# --------------------------------------------------------------------------- low-bit states (torchao)


@pytest.fixture(autouse=True)
def eager_low_bit_step(monkeypatch):
    """The low-bit AdamW step runs eagerly in this module (compiling it costs seconds per piece size), but in
    the tests that ask for ``compiled_low_bit_step``; each test sees the eager step's note afresh."""
    from ftprog.core import _optim

    def fresh():  # a test may compile the step under a patched torch.compile, or make it fail
        _optim._compiled_adam_steps.cache_clear()
        _optim._compile_failed.clear()
        _optim._eager_reasons.clear()

    monkeypatch.setenv(_optim.COMPILE_OPTIMIZER_ENV, "0")
    fresh()
    yield
    fresh()


@pytest.fixture
def compiled_low_bit_step(monkeypatch, eager_low_bit_step):
    from ftprog.core import _optim

    monkeypatch.delenv(_optim.COMPILE_OPTIMIZER_ENV)


def _low_bit_params(dtype, seed=0, w_shape=(64, 128)):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(w_shape, generator=g).to(dtype), "b": torch.randn(100, generator=g).to(dtype)}


def _low_bit_grads(step, dtype, w_shape=(64, 128)):
    return _low_bit_params(dtype, seed=50 + step, w_shape=w_shape)


def _run_against_torchao(kind, dtype, steps=3, w_shape=(64, 128), stochastic_rounding=False):
    """Our update and torchao's ``AdamW8bit`` / ``AdamWFp8`` / ``AdamW4bit`` side by side: (our params, state,
    their params, state). Each run draws torch's random bits (stochastic rounding) from the same seed."""
    from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8

    params = _low_bit_params(dtype, w_shape=w_shape)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = adamw(1e-2, weight_decay=0.1, state_dtype=kind, stochastic_rounding=stochastic_rounding)
    state = opt.init(params)
    theirs = {"int8": AdamW8bit, "fp8": AdamWFp8, "int4": AdamW4bit}[kind](
        list(ref.values()), lr=1e-2, weight_decay=0.1, bf16_stochastic_round=stochastic_rounding)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        for step in range(steps):
            params, state = opt.update(_low_bit_grads(step, dtype, w_shape), state, params, inplace=step % 2 == 0)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        for step in range(steps):
            grads = _low_bit_grads(step, dtype, w_shape)
            for k, p in ref.items():
                p.grad = grads[k].clone()
            theirs.step()
    return params, state, {k: p.detach() for k, p in ref.items()}, {k: theirs.state[p] for k, p in ref.items()}


def _assert_same_as_torchao(params, state, their_params, their_state):
    for k, p in their_params.items():
        assert torch.equal(params[k], p), k
        for name in ("exp_avg", "exp_avg_sq"):
            ours, theirs = getattr(state, name)[k], their_state[k][name]
            if k == "w":  # quantized: the same codes and block scales
                assert type(ours) is type(theirs)
                assert torch.equal(ours.codes, theirs.codes) and torch.equal(ours.scale, theirs.scale), (k, name)
            else:
                assert torch.equal(ours, theirs), (k, name)


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_low_bit_adamw_equals_eager_torchao(monkeypatch, kind, dtype):
    """state_dtype int8 / fp8 / int4 with FTPROG_COMPILE_OPTIMIZER=0: torchao's quantized moments and update,
    equal to AdamW8bit / AdamWFp8 / AdamW4bit run eagerly bit for bit, also when a tensor is updated in pieces
    (int4: two codes a byte, 128-element blocks); one note says so."""
    from ftprog.core import _optim

    monkeypatch.setattr(_optim, "_LOW_BIT_PIECE", 1024)  # "w" (8192 elements) goes in 8 pieces
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # torchao compiles its step: run it eagerly
    with pytest.warns(UserWarning, match="runs eagerly \\(FTPROG_COMPILE_OPTIMIZER=0\\)") as notes:
        ours = _run_against_torchao(kind, dtype)
    assert len([n for n in notes if "runs eagerly" in str(n.message)]) == 1
    assert type(ours[1].exp_avg["w"]).__name__ == {"int8": "OptimState8bit", "fp8": "OptimStateFp8",
                                                   "int4": "OptimState4bit"}[kind]
    _assert_same_as_torchao(*ours)


def test_eager_low_bit_stochastic_rounding_is_torchaos(monkeypatch):
    """stochastic_rounding with int8 moments on bf16 params is torchao's ``bf16_stochastic_round``: equal to
    AdamW8bit's bit for bit from the same random seed, and it moves the params differently than rounding to
    nearest does."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setenv("FTPROG_COMPILE_OPTIMIZER", "0")
    with pytest.warns(UserWarning, match="runs eagerly"):
        ours = _run_against_torchao("int8", torch.bfloat16, stochastic_rounding=True)
        nearest = _run_against_torchao("int8", torch.bfloat16)
    _assert_same_as_torchao(*ours)
    assert not torch.equal(ours[0]["w"], nearest[0]["w"])


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_compiled_low_bit_adamw_equals_compiled_torchao(compiled_low_bit_step, kind):
    """The compiled step (flat pieces of fixed sizes) equals torchao's AdamWFp8 / AdamW4bit, which compile their
    step per param shape, bit for bit (measured, not run here as int8 compiles 3-4x slower: also int8, fp32
    params, 2-D params cut in pieces); its state through safetensors resumes exactly. fp8's "w" is one piece, so
    both compile the same graph and inductor's cache halves the compile time; int4's is two (128-element
    blocks)."""
    params, state, their_params, their_state = _run_against_torchao(kind, torch.bfloat16, steps=2, w_shape=(4096,))
    _assert_same_as_torchao(params, state, their_params, their_state)
    opt = adamw(1e-2, weight_decay=0.1, state_dtype=kind)
    saved = st_load(st_save(dict(params)))
    resumed_state = load_state_dict(opt, saved, st_load(st_save(state_dict(state))))
    grads = _low_bit_grads(2, torch.bfloat16, (4096,))
    straight, straight_state = opt.update(grads, state, params)
    resumed, resumed_state = opt.update(grads, resumed_state, saved)
    assert_bitwise(resumed, straight)
    assert_bitwise(state_dict(resumed_state), state_dict(straight_state))


def test_failed_compile_falls_back_to_the_eager_step(monkeypatch, compiled_low_bit_step):
    """No C++ compiler (or Triton): one note, then the eager step, equal to torchao's eager optimizer."""
    import torch._dynamo

    def broken(*args):
        raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found\nmore")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken if fn.__module__ == "ftprog.core._optim" else fn)
    with pytest.warns(UserWarning, match="torch.compile failed: InvalidCxxCompiler: No working C") as notes:
        ours = _run_against_torchao("fp8", torch.float32)
    assert len([n for n in notes if "runs eagerly" in str(n.message)]) == 1
    _assert_same_as_torchao(*ours)


@pytest.mark.parametrize("n,block,sizes", [
    (8192, 256, [4096, 4096]), (4096 + 3 * 256, 256, [4096, 256, 256, 256]),
    (3 * 2**18 + 2**16 + 1024, 256, [2**18] * 3 + [2**16, 1024]), (100, 0, [100]),
    (2**20 + 5, 0, [2**20, 5]), (0, 0, []), (2**18 + 2048 + 128, 128, [2**17, 2**17, 2048, 128])])
def test_low_bit_cuts_are_a_few_fixed_sizes(n, block, sizes):
    from ftprog.core._optim import _LOW_BIT_PIECE, _low_bit_cuts

    cuts = _low_bit_cuts(n, block)
    assert [c.stop - c.start for c in cuts] == sizes
    assert [c.start for c in cuts] == [sum(sizes[:i]) for i in range(len(sizes))]
    if block:
        assert all(size in {block * 4**k for k in range(10)} and size <= _LOW_BIT_PIECE for size in sizes)


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
def test_low_bit_state_dict_resumes_bitwise(kind):
    opt = adamw(1e-2, weight_decay=0.1, state_dtype=kind)
    params = _low_bit_params(torch.bfloat16)

    def run(params, state, steps, start):
        for step in range(start, start + steps):
            params, state = opt.update(_low_bit_grads(step, torch.bfloat16), state, params)
        return params, state

    straight, straight_state = run(params, opt.init(params), 4, 0)
    half, state = run(params, opt.init(params), 2, 0)
    blob = st_save(state_dict(state))
    assert {"exp_avg.w.codes", "exp_avg.w.scale", "exp_avg.b"} <= set(st_load(blob))
    state2 = load_state_dict(adamw(1e-2, weight_decay=0.1, state_dtype=kind), st_load(st_save(dict(half))),
                             st_load(blob))
    resumed, resumed_state = run(half, state2, 2, 2)
    assert_bitwise(resumed, straight)
    assert_bitwise(state_dict(resumed_state), state_dict(straight_state))


def test_low_bit_state_errors():
    with pytest.raises(ValueError, match="for adamw only"):
        sgd(1e-2, momentum=0.9, state_dtype="int8")
    from ftprog.core import ConfigError
    from ftprog.programs.sft_config import OptimizerSection, SFTConfig
    from ftprog.programs.training import build_optimizer

    cfg = SFTConfig(optimizer=OptimizerSection(name="sgd", state_dtype="fp8"))
    with pytest.raises(ConfigError, match="needs optimizer.name='adamw'") as e:
        build_optimizer(cfg, 10)
    assert e.value.key == "optimizer.state_dtype"


# --------------------------------------------------------------------------- optimizer in the backward


def _tiny_step_setup(state_dtype=None):
    from ftprog.core import from_config, token_loss_sum
    from ftprog.transforms import trainable

    model = trainable(from_config("tiny", seed=0))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 16), generator=g) for _ in range(3)]

    def loss_fn(m, tokens):
        return token_loss_sum(m, tokens[:, :-1], tokens[:, 1:]) / tokens[:, 1:].numel(), {}

    return model, batches, loss_fn, adamw(cosine(1e-2, 3, 1), weight_decay=0.1, state_dtype=state_dtype)


def test_in_backward_step_equals_a_normal_step(tmp_path):
    """optimizer.in_backward: the same params, state and gradient norm as value_and_grad + apply_gradients
    without clipping (fp32), every leaf updated in the backward and no gradient kept."""
    from ftprog.core import value_and_grad
    from ftprog.programs.training import apply_gradients, in_backward_step

    model, batches, loss_fn, opt = _tiny_step_setup()
    plain, eager = model, model.with_params({k: v.clone() for k, v in model.trainable_params().items()})
    plain_state, eager_state = opt.init(plain.trainable_params()), opt.init(eager.trainable_params())
    grad_fn = value_and_grad(loss_fn, has_aux=True)
    for step, tokens in enumerate(batches):
        (loss, _), grads = grad_fn(plain, tokens)
        plain, plain_state, norm, lr = apply_gradients(plain, grads, loss, opt, plain_state, 0.0, step, tmp_path)
        loss2, _, eager, eager_state, norm2, lr2 = in_backward_step(loss_fn, eager, opt, eager_state, step, tmp_path,
                                                                    tokens)
        assert torch.equal(loss, loss2) and lr == lr2
        torch.testing.assert_close(norm2, norm, rtol=1e-6, atol=0)
    assert eager_state.count == plain_state.count == 3
    assert_bitwise(eager.trainable_params(), plain.trainable_params())
    assert_bitwise(state_dict(eager_state), state_dict(plain_state))
    assert all(t.grad is None for t in eager.trainable_params().values())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_in_backward_step_resumes_bitwise(tmp_path, kind):
    """Stopped after a step (params and int8 / int4 optimizer state through safetensors), the next in-backward
    step continues exactly as an uninterrupted run."""
    from ftprog.programs.training import in_backward_step

    model, batches, loss_fn, opt = _tiny_step_setup(kind)

    def run(model, state, steps, start):
        for step in range(start, start + steps):
            _, _, model, state, _, _ = in_backward_step(loss_fn, model, opt, state, step, tmp_path, batches[step])
        return model, state

    fresh = lambda m: m.with_params({k: v.clone() for k, v in m.trainable_params().items()})  # noqa: E731
    straight, straight_state = run(fresh(model), opt.init(model.trainable_params()), 3, 0)
    half, state = run(fresh(model), opt.init(model.trainable_params()), 2, 0)
    saved_params, saved_state = st_save(dict(half.trainable_params())), st_save(state_dict(state))
    resumed_model = model.with_params(st_load(saved_params))
    resumed_state = load_state_dict(opt, resumed_model.trainable_params(), st_load(saved_state))
    resumed, resumed_state = run(resumed_model, resumed_state, 1, 2)
    assert_bitwise(resumed.trainable_params(), straight.trainable_params())
    assert_bitwise(state_dict(resumed_state), state_dict(straight_state))


@pytest.mark.parametrize("change, message", [
    ({"grad_accum": 2}, "grad_accum=2"),
    ({}, "max_grad_norm=1.0: clipping to a global norm needs every gradient"),
])
def test_in_backward_config_errors(change, message):
    import attrs

    from ftprog.core import ConfigError
    from ftprog.programs.sft_config import OptimizerSection, SFTConfig
    from ftprog.programs.training import build_optimizer

    clip = 0.0 if change else 1.0
    cfg = SFTConfig(optimizer=OptimizerSection(in_backward=True, max_grad_norm=clip), **change)
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        build_optimizer(cfg, 10)
    assert e.value.key == "optimizer.in_backward"
    build_optimizer(attrs.evolve(cfg, grad_accum=1, optimizer=attrs.evolve(cfg.optimizer, max_grad_norm=0.0)), 10)
