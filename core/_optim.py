"""Functional optimizers over flat parameter dicts, in the style of optax.

Parameters and gradients are flat ``{dotted.path: tensor}`` dicts (what
``Model.trainable_params()`` and ``value_and_grad`` give). An optimizer is an
immutable value with two methods::

    opt = adamw(cosine(3e-4, total_steps=1000, warmup_steps=100), weight_decay=0.1)
    state = opt.init(params)
    for batch in batches:
        loss, grads = value_and_grad(loss_fn)(model, batch)
        grads, norm = clip_by_global_norm(grads, 1.0)
        params, state = opt.update(grads, state, params)
        model = model.with_params(params)

``state`` is an attrs value holding the step count (a Python int: the number
of updates applied so far) and dicts of fp32 tensors keyed like the params.
:func:`state_dict` flattens it to ``{str: Tensor}`` (safetensors-ready, the
count as a 0-d int64 tensor) and :func:`load_state_dict` rebuilds it, so a run
resumed from a checkpoint continues bit for bit.

Memory and mutation contract
----------------------------
* **Params** are never mutated by default: ``update`` returns new tensors. For
  AdamW the new tensors are a clone of the params that the fused kernel then
  updates in place (the foreach path folds the clone into the weight-decay
  multiply). The cost is one extra params-sized allocation for as long as the
  caller holds both the old and the new params (drop the old ones, as
  ``model = model.with_params(params)`` does, and it is transient) plus one
  extra read+write pass over the params. ``update(..., inplace=True)``
  updates the given tensors in place instead and returns them: no extra
  memory, as fast as ``torch.optim.AdamW``, but any other holder of those
  tensors sees the change.
* **State** is donated, as with ``jax.jit(donate_argnums=...)``: its buffers
  are updated in place and shared by the returned state. Treat the state
  passed to ``update`` as consumed; :func:`state_dict` the *returned* state
  if you want to save it.
* **Grads** are never mutated.

Precision
---------
Optimizer state is fp32 for fp32/bf16/fp16 params (fp64 for fp64 params) unless
``state_dtype`` says otherwise (bf16 moments: the fused kernel updates bf16
params and moments directly, as ``torch.optim.AdamW`` does); no fp32 master
copy of the params is kept. For low-precision params each update
upcasts the params (and grads) to fp32, runs exactly the fp32 AdamW/SGD step
of ``torch.optim`` on them with the fp32 state, and rounds the result to the
param dtype once (round to nearest even). This equals ``torch.optim.AdamW``
run on fp32 copies of the params with the params rounded back to bf16 after
every step, bit for bit; compared with ``torch.optim.AdamW`` on bf16 params
(which keeps bf16 state and rounds after every elementary op) it is more
accurate. The upcast happens in pieces of at most ``_UPCAST_NUMEL`` elements
(large tensors are cut into flat ranges), so the transient fp32 copies stay
under 2 x 4 MiB whatever the model size. Updates smaller than half a bf16
ulp of a weight are lost, as they always are without master weights, unless
``stochastic_rounding=True``: the fp32 result is then rounded to the bf16
neighbour above or below at random, with the probabilities that keep it
right on average (bf16 moments are upcast for the step and rounded the same
way), at no extra memory beyond the pieces; fp32 params (or LoRA, whose
adapter weights are usually fp32) need none.

Schedules
---------
A schedule is any callable ``step -> lr`` where ``step`` is the number of
updates already applied (0 for the first update), the convention of
``torch.optim.lr_scheduler.LambdaLR`` stepped after each optimizer step, i.e.
of the ``transformers`` training loop. The built-in ones warm up linearly
from 0 (``lr * step / warmup_steps``, so the very first update has lr 0,
exactly as transformers' ``get_*_schedule_with_warmup``) and then hold
(:func:`constant`) or decay to ``final_lr`` at ``step == total_steps``
(:func:`linear`, :func:`cosine`); past ``total_steps`` they stay at
``final_lr``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, Union

import attrs
import torch

from ._tree import is_dtensor

Tensor = torch.Tensor
Params = Mapping[str, Tensor]
Schedule = Callable[[int], float]
LearningRate = Union[float, Schedule]

__all__ = [
    "AdamW", "AdamWState", "LOW_BIT_STATES", "Optimizer", "SGD", "SGDState", "Schedule", "adamw", "clip_by_global_norm", "constant",
    "cosine", "linear", "load_state_dict", "restrict", "schedule_by_name", "sgd", "state_dict",
]

# Most elements handed to one kernel call (bounds the foreach path's
# temporaries; a single larger tensor still goes whole) and most elements
# upcast to fp32 at once for low-precision params or grads (large contiguous
# tensors are cut into flat ranges at multiples of _SPLIT_ALIGN). The math is
# elementwise and the cuts aligned, so bucketing never changes a result.
# 2**20 fp32 elements (4 MiB) stay in cache and reuse freed heap blocks: with
# 2**24, every piece page-faults fresh memory and the step runs ~4x slower.
_BUCKET_NUMEL = 1 << 26
_UPCAST_NUMEL = 1 << 20
_SPLIT_ALIGN = 1 << 12


class Optimizer(Protocol):
    """What :func:`adamw` and :func:`sgd` return."""

    def init(self, params: Params) -> Any: ...

    def update(self, grads: Params, state: Any, params: Params, *,
               inplace: bool = False) -> tuple[dict[str, Tensor], Any]: ...

    def lr_at(self, count: int) -> float: ...


# --------------------------------------------------------------------------- validation


def _check_number(name: str, value: Any, *, low: float = 0.0, high: float | None = None,
                  low_open: bool = False, high_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    bad = not math.isfinite(value) or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value!r}")
    return value


def _check_lr(lr: Any) -> LearningRate:
    if callable(lr):
        return lr
    return _check_number("lr", lr)


def _lr_at(lr: LearningRate, step: int) -> float:
    if not callable(lr):
        return lr
    value = lr(step)
    if isinstance(value, Tensor):
        value = value.item()
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"the learning-rate schedule returned {value!r} at step {step}; it must be finite and >= 0")
    return value


def _check_int(name: str, value: Any, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


# --------------------------------------------------------------------------- plumbing


def _lists(grads: Params, params: Params) -> tuple[list[str], list[Tensor], list[Tensor]]:
    """Params and grads as aligned lists (params order), with clear errors on mismatch."""
    keys = list(params)
    if grads.keys() != params.keys():
        missing = [k for k in keys if k not in grads]
        extra = [k for k in grads if k not in params]
        raise ValueError(f"grads and params have different paths: missing grads {missing[:5]}, "
                         f"unexpected grads {extra[:5]}")
    ps = [params[k] for k in keys]
    gs = [grads[k] for k in keys]
    for k, p, g in zip(keys, ps, gs):
        if p.shape != g.shape:
            raise ValueError(f"grad of {k!r} has shape {tuple(g.shape)}, param has {tuple(p.shape)}")
    return keys, ps, gs


def _state_list(name: str, bufs: Mapping[str, Tensor], keys: list[str], ps: list[Tensor]) -> list[Tensor]:
    if bufs.keys() != set(keys):
        missing = [k for k in keys if k not in bufs]
        extra = [k for k in bufs if k not in set(keys)]
        raise ValueError(f"optimizer state {name!r} does not match the params: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} (was the state made by init() on these params?)")
    out = [bufs[k] for k in keys]
    for k, p, s in zip(keys, ps, out):
        if s.shape != p.shape:
            raise ValueError(f"optimizer state {name}[{k!r}] has shape {tuple(s.shape)}, param has {tuple(p.shape)}")
    return out


def _state_dtype(dtype: torch.dtype, requested: torch.dtype | None = None) -> torch.dtype:
    """``requested``, else fp32 state for fp32 and narrower floats, fp64 for fp64."""
    if not dtype.is_floating_point:
        raise TypeError(f"optimizers need floating-point params, got {dtype}")
    return requested if requested is not None else torch.promote_types(dtype, torch.float32)


LOW_BIT_STATES = ("int8", "fp8", "int4")
"""AdamW ``state_dtype`` values kept quantized by torchao, block-wise with one fp32 scale per block: ``int8``
(``OptimState8bit``, a dynamic-tree code map, 256-element blocks), ``fp8`` (``OptimStateFp8``, e4m3, 256) and
``int4`` (``OptimState4bit``, two 4-bit codes a byte, 128-element blocks: half of int8's memory). int8 and fp8
run on CPU and CUDA (torch 2.13, torchao 0.18); int4 was checked on CPU only. Tensors under 4096 elements, or
not made of whole blocks, keep plain moments in the param's dtype, as torchao's ``AdamW8bit`` / ``AdamWFp8`` /
``AdamW4bit`` do."""
_LOW_BIT_BLOCK = {"int8": 256, "fp8": 256, "int4": 128}  # elements per fp32 scale of each kind (torchao's defaults)


def _check_state_dtype(dtype: Any, low_bit: bool = False) -> torch.dtype | str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in LOW_BIT_STATES:
        if not low_bit:
            raise ValueError(f"state_dtype={dtype!r} (torchao's quantized state) is for adamw only")
        return dtype
    from ._checkpoint import as_dtype

    dtype = as_dtype(dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"state_dtype must be a floating-point dtype (float32, bfloat16, ...)"
                         f"{' or one of ' + ', '.join(LOW_BIT_STATES) if low_bit else ''}, got {dtype}")
    return dtype


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _zeros(params: Params, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Zero state buffers like the params (sharded like them when they are DTensors)."""
    return {k: torch.zeros_like(p, dtype=_state_dtype(p.dtype, dtype), memory_format=torch.contiguous_format)
            for k, p in params.items()}


def _clone(ts: list[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    out = [torch.empty_like(t, dtype=dtype) for t in ts]
    if out:
        torch._foreach_copy_(out, ts)
    return out


def _groups(ps: list[Tensor], gs: list[Tensor], states: list[list[Tensor]]) -> list[list[int]]:
    """Indices grouped by (param device, param dtype, grad device, grad dtype, state dtype)."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(ps, gs)):
        groups.setdefault((p.device, p.dtype, g.device, g.dtype, states[0][i].dtype if states else None),
                          []).append(i)
    return list(groups.values())


Piece = tuple[int, Union[slice, None]]  # tensor index, flat range of it (None: all of it)


def _buckets(idx: list[int], ts: list[list[Tensor]], limit: int, split: bool) -> Iterator[list[Piece]]:
    """Runs of pieces of at most ``limit`` elements (a lone tensor may exceed it unless ``split``).

    With ``split``, tensors bigger than ``limit`` that are contiguous in every
    list of ``ts`` are cut into flat ranges.
    """
    bucket: list[Piece] = []
    size = 0
    # Cut points on multiples of _SPLIT_ALIGN elements: CPU kernels run a
    # vector body and a scalar tail that may round differently, and aligned
    # cuts keep every element in the part of the loop it has in one call.
    step = max(_SPLIT_ALIGN, limit // _SPLIT_ALIGN * _SPLIT_ALIGN)
    for i in idx:
        n = ts[0][i].numel()
        if split and n > step and all(t[i].is_contiguous() for t in ts):
            parts: list[tuple[Piece, int]] = [((i, slice(a, min(a + step, n))), min(step, n - a))
                                              for a in range(0, n, step)]
        else:
            parts = [((i, None), n)]
        for piece, m in parts:
            if bucket and size + m > limit:
                yield bucket
                bucket, size = [], 0
            bucket.append(piece)
            size += m
    if bucket:
        yield bucket


def _piece(t: Tensor, sl: slice | None) -> Tensor:
    return t if sl is None else t.view(-1)[sl]


# kernel(params, grads, states, inplace) -> updated params; params, grads and
# states all in the state dtype; states are updated in place.
Kernel = Callable[[list[Tensor], list[Tensor], list[list[Tensor]], bool], list[Tensor]]


def _apply(kernel: Kernel, ps: list[Tensor], gs: list[Tensor], states: list[list[Tensor]],
           inplace: bool, dither: list[int] | None = None) -> list[Tensor]:
    """Run ``kernel`` bucket by bucket, upcasting low-precision params and grads to the state dtype.

    ``dither``: one seed per param for stochastic rounding (:func:`_round_stochastic`): bf16 params and bf16
    states are then upcast to fp32 too and written back rounded stochastically.

    Sharded (DTensor) params, grads and states are updated shard by shard: the
    update is elementwise, so each rank runs it on its local shards (which
    share storage with the DTensors) and the new params are wrapped back.
    """
    if any(is_dtensor(t) for t in ps):
        local = lambda ts: [t.to_local() if is_dtensor(t) else t for t in ts]  # noqa: E731
        new = _apply(kernel, local(ps), local(gs), [local(s) for s in states], inplace, dither)
        return [type(p).from_local(n, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                if is_dtensor(p) else n for n, p in zip(new, ps)]
    out: list[Tensor | None] = [None] * len(ps)
    for idx in _groups(ps, gs, states):
        p0, g0 = ps[idx[0]], gs[idx[0]]
        if g0.device != p0.device:
            raise ValueError(f"grads on {g0.device} but params on {p0.device}")
        compute = states[0][idx[0]].dtype if states else _state_dtype(p0.dtype)
        rounded = dither is not None and torch.bfloat16 in (p0.dtype, compute)
        if rounded:  # the step in fp32, every bf16 result rounded stochastically
            compute = torch.float32
        if p0.dtype == compute and g0.dtype == compute and (not states or states[0][idx[0]].dtype == compute):
            # the kernel works on the tensors themselves
            for bucket in _buckets(idx, [ps], _BUCKET_NUMEL, split=False):
                ids = [i for i, _ in bucket]
                res = kernel([ps[i] for i in ids], [gs[i] for i in ids], [[s[i] for i in ids] for s in states],
                             inplace)
                for i, r in zip(ids, res):
                    out[i] = r
            continue
        # Upcast piece by piece into bounded fp32 temporaries, write back with one rounding.
        for i in idx:
            out[i] = ps[i] if inplace else torch.empty_like(ps[i])
        for bucket in _buckets(idx, [ps, gs, out, *states], _UPCAST_NUMEL, split=True):  # type: ignore[list-item]
            p_v = [_piece(ps[i], sl) for i, sl in bucket]
            r_v = [_piece(out[i], sl) for i, sl in bucket]  # type: ignore[arg-type]
            s_v = [[_piece(s[i], sl) for i, sl in bucket] for s in states]
            g_v = [_piece(gs[i], sl) for i, sl in bucket]
            g_c = g_v if g0.dtype == compute else _clone(g_v, compute)
            s_c = [sv if not sv or sv[0].dtype == compute else _clone(sv, compute) for sv in s_v]
            if p0.dtype == compute:
                if not inplace:
                    torch._foreach_copy_(r_v, p_v)
                kernel(r_v, g_c, s_c, True)
            else:
                p_c = _clone(p_v, compute)
                kernel(p_c, g_c, s_c, True)
                if rounded:
                    _round_stochastic(r_v, p_c, _piece_seeds(dither, bucket, 0))  # type: ignore[arg-type]
                else:
                    torch._foreach_copy_(r_v, p_c)  # one rounding to the param dtype
            for j, (sv, sc) in enumerate(zip(s_v, s_c)):
                if sc is not sv:  # upcast bf16 states (stochastic rounding only)
                    _round_stochastic(sv, sc, _piece_seeds(dither, bucket, j + 1))  # type: ignore[arg-type]
            del g_c, s_c
    return out  # type: ignore[return-value]


@functools.cache
def _dither_noise(device: torch.device, size: int) -> Tensor:
    """``size`` fixed random 16-bit values (int32) on ``device``, made once per process from a fixed seed: each
    rounding takes the window of them at an offset its seed picks."""
    generator = torch.Generator().manual_seed(0x5EED)
    return torch.randint(0, 1 << 16, (size,), dtype=torch.int32, generator=generator).to(device)


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a 64-bit integer hash, so nearby seeds give unrelated noise."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _dither_seeds(keys: list[str], count: int) -> list[int]:
    """One stochastic-rounding seed per param: a hash of its name and the update's number, so the noise is the
    same in a resumed run (nothing to checkpoint) and differs between params and between steps."""
    return [_mix64(_mix64(count) ^ zlib.crc32(k.encode())) for k in keys]


def _piece_seeds(dither: list[int], bucket: list[Piece], which: int) -> list[int]:
    """Seeds of a bucket's pieces: their param's seed, the piece's start and which tensor (0: the param, 1...:
    the states) mixed in, so the noise does not depend on how params are bucketed."""
    return [_mix64(dither[i] ^ _mix64(((sl.start if sl is not None else 0) << 4) | which)) for i, sl in bucket]


def _round_stochastic(dst: list[Tensor], src: list[Tensor], seeds: list[int]) -> None:
    """``dst`` (bf16) <- ``src`` (fp32) rounded stochastically: to the bf16 neighbour above or below in
    magnitude, with probabilities that make the result equal ``src`` in expectation (updates smaller than half
    a bf16 step then still move a weight on average, where rounding to nearest drops them every time).
    ``src`` is overwritten. Adding 16 random bits under bf16's mantissa and truncating is that rounding; the
    carry into the exponent and into inf is what rounding up does. A ``dst`` of another dtype (fp16) is
    rounded to nearest."""
    noise = _dither_noise(src[0].device, 2 * _UPCAST_NUMEL) if src else None
    for d, x, seed in zip(dst, src, seeds):
        if d.dtype != torch.bfloat16:
            d.copy_(x)
            continue
        n = x.numel()
        if n > _UPCAST_NUMEL:  # a lone tensor that could not be cut: noise of its own
            generator = torch.Generator(x.device).manual_seed(seed & (2**63 - 1))
            r = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=generator, device=x.device)
        else:
            offset = seed % (_UPCAST_NUMEL + 1)
            r = noise[offset:offset + n].view(x.shape)  # type: ignore[index]
        bits = x.view(torch.int32)
        bits.add_(r).bitwise_and_(-65536)  # -65536: 0xFFFF0000, the 16 bits bf16 keeps
        d.copy_(x)


# --------------------------------------------------------------------------- AdamW


@functools.cache
def _fused_devices() -> tuple[str, ...]:
    if not hasattr(torch, "_fused_adamw_"):
        return ()
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        return tuple(_get_fused_kernels_supported_devices())
    except Exception:  # private helper moved: CUDA has had the kernel since torch 2.0
        return ("cuda",)


@attrs.frozen
class AdamWState:
    """AdamW state: ``count`` updates applied so far, first and second moments (fp32 unless ``state_dtype``)."""

    count: int
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]


@attrs.frozen
class AdamW:
    """AdamW (decoupled weight decay), numerically the update of ``torch.optim.AdamW``.

    Built by :func:`adamw`, which validates the hyper-parameters.
    """

    lr: LearningRate
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: bool | None = None
    state_dtype: torch.dtype | str | None = None
    stochastic_rounding: bool = False

    def init(self, params: Params) -> AdamWState:
        """Zero moments shaped like ``params`` (fp32, or ``state_dtype``; torchao's quantized ones for
        :data:`LOW_BIT_STATES`), count 0."""
        if isinstance(self.state_dtype, str):
            return AdamWState(0, _low_bit_zeros(params, self.state_dtype, signed=True),
                              _low_bit_zeros(params, self.state_dtype, signed=False))
        return AdamWState(0, _zeros(params, self.state_dtype), _zeros(params, self.state_dtype))

    def lr_at(self, count: int) -> float:
        """The learning rate of the update applied when ``state.count == count``."""
        return _lr_at(self.lr, count)

    @torch.no_grad()
    def update(self, grads: Params, state: AdamWState, params: Params, *,
               inplace: bool = False) -> tuple[dict[str, Tensor], AdamWState]:
        """One AdamW step: ``(new_params, new_state)``; see the module docstring for what is mutated."""
        keys, ps, gs = _lists(grads, params)
        ms = _state_list("exp_avg", state.exp_avg, keys, ps)
        vs = _state_list("exp_avg_sq", state.exp_avg_sq, keys, ps)
        lr = self.lr_at(state.count)
        t = state.count + 1
        beta1, beta2 = self.betas
        wd, eps = self.weight_decay, self.eps
        if isinstance(self.state_dtype, str):
            new = _low_bit_adamw(ps, gs, ms, vs, lr=lr, betas=self.betas, eps=eps, wd=wd, t=t, inplace=inplace,
                                 stochastic_rounding=self.stochastic_rounding)
            return dict(zip(keys, new)), AdamWState(t, dict(state.exp_avg), dict(state.exp_avg_sq))
        fused_devices = _fused_devices()
        steps: dict[torch.device, Tensor] = {}

        def kernel(p: list[Tensor], g: list[Tensor], s: list[list[Tensor]], in_place: bool) -> list[Tensor]:
            m, v = s
            device = p[0].device
            use_fused = self.fused
            contiguous = all(x.is_contiguous() for x in (*p, *g, *m, *v))
            if use_fused is None:
                use_fused = device.type in fused_devices and contiguous
            elif use_fused and device.type not in fused_devices:
                raise RuntimeError(f"fused AdamW is not available for {device.type} tensors in torch "
                                   f"{torch.__version__} (supported: {list(fused_devices)}); use fused=None or False")
            if use_fused:
                out = p if in_place else _clone(p)
                if device not in steps:  # the kernel reads the step (fp32) from a tensor on the device;
                    # torch.full is a fill kernel, not a host-to-device copy
                    steps[device] = torch.full((), float(t), dtype=torch.float32, device=device)
                torch._fused_adamw_(out, g, m, v, [], [steps[device]] * len(out), lr=lr, beta1=beta1,
                                    beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
                return out
            return _adamw_foreach(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, wd=wd, t=t,
                                  inplace=in_place)

        dither = _dither_seeds(keys, state.count) if self.stochastic_rounding else None
        new = _apply(kernel, ps, gs, [ms, vs], inplace, dither)
        return dict(zip(keys, new)), AdamWState(t, dict(state.exp_avg), dict(state.exp_avg_sq))


def _adamw_foreach(p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor], *, lr: float,
                   beta1: float, beta2: float, eps: float, wd: float, t: int, inplace: bool) -> list[Tensor]:
    """The same sequence of foreach ops as ``torch.optim.AdamW(foreach=True)``, so results match bit for bit."""
    if inplace:
        out = p
        if wd != 0:
            torch._foreach_mul_(out, 1 - lr * wd)
    else:  # the clone and the decoupled weight decay in one pass
        out = torch._foreach_mul(p, 1 - lr * wd) if wd != 0 else _clone(p)
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, 1 - beta2)
    bias_correction1 = 1 - beta1 ** float(t)
    bias_correction2 = 1 - beta2 ** float(t)
    step_size = (lr / bias_correction1) * -1
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [bias_correction2 ** 0.5] * len(denom))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(out, m, denom, [step_size] * len(out))
    return out


# --------------------------------------------------------------------------- low-bit AdamW state (torchao)

# The largest flat piece of a quantized moment handed to the compiled step. Pieces are block * 4**k elements
# (_LOW_BIT_BLOCK; at most 7 sizes, usually 2), so the static-shape kernel compiles once per size and is reused
# everywhere. 2**18 measured fastest on CPU (int8: 30 ns/element; 2**20: 60, the kernel's passes over a piece
# no longer stay in cache; 2**16: 34).
_LOW_BIT_PIECE = 1 << 18
COMPILE_OPTIMIZER_ENV = "FTPROG_COMPILE_OPTIMIZER"
"""``FTPROG_COMPILE_OPTIMIZER=0`` runs the low-bit AdamW step (``state_dtype`` int8 / fp8 / int4) eagerly instead
of compiled: no compile time, ~5-10x slower updates, the same result but for last-bit rounding."""


def _low_bit_zeros(params: Params, kind: str, signed: bool) -> dict[str, Tensor]:
    """Zero moments as torchao's ``AdamW8bit`` / ``AdamWFp8`` / ``AdamW4bit`` make them: quantized for tensors of
    at least 4096 elements that split into whole blocks, plain zeros in the param's dtype for the rest (norms,
    biases)."""
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    block = _LOW_BIT_BLOCK[kind]
    out = {}
    for k, p in params.items():
        if is_dtensor(p):
            raise ValueError(f"state_dtype={kind!r} does not support sharded params ({k!r} is a DTensor)")
        if p.numel() >= 4096 and p.numel() % block == 0:
            if kind == "fp8":
                out[k] = OptimStateFp8.zeros(p.shape, block, p.device, dtype=p.dtype)
            else:
                cls = OptimState8bit if kind == "int8" else OptimState4bit
                out[k] = cls.zeros(p.shape, signed, block, p.device, dtype=p.dtype)
        else:
            out[k] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    return out


def _is_quantized_state(t: Tensor) -> bool:
    """A torchao low-bit moment (``OptimState8bit`` / ``OptimStateFp8`` / ``OptimState4bit``), not a plain tensor
    or a DTensor."""
    return type(t).__module__.startswith("torchao.optim.")


def _state_piece(t: Tensor, sl: slice) -> Tensor:
    """Elements ``sl`` of a flat view of a moment; of a quantized one, a state of the same kind over views of its
    codes and block scales (``sl`` on block boundaries), so writing the piece writes the moment."""
    if not _is_quantized_state(t):
        return t.view(-1)[sl]
    names, meta = t.__tensor_flatten__()
    inner = {name: getattr(t, name) for name in names}
    per_code = t.numel() // t.codes.numel()  # elements a stored code holds: 1, or 2 for int4 (two codes a byte)
    inner["codes"] = inner["codes"].view(-1)[sl.start // per_code: sl.stop // per_code]
    inner["scale"] = inner["scale"][sl.start // t.block_size: sl.stop // t.block_size]
    if type(t).__name__ == "OptimState4bit":  # metadata [signed, shape, dtype]: the piece's own shape, flat
        meta = [meta[0], (sl.stop - sl.start,), meta[2]]
    return type(t).__tensor_unflatten__(inner, meta, None, None)


def _low_bit_cuts(n: int, block: int) -> list[slice]:
    """Flat ranges covering ``n`` elements. Quantized moments (``block`` elements per scale, ``n`` a multiple of
    it): greedy pieces of ``block * 4**k`` elements, at most ``_LOW_BIT_PIECE`` (a few fixed sizes); plain ones
    (``block`` 0): ``_UPCAST_NUMEL`` pieces and a remainder (the plain step is compiled for any size)."""
    if not block:
        return [slice(a, min(a + _UPCAST_NUMEL, n)) for a in range(0, n, _UPCAST_NUMEL)]
    out, start, size = [], 0, block
    while size * 4 <= _LOW_BIT_PIECE:
        size *= 4
    while start < n:
        while size > n - start:
            size //= 4
        out.append(slice(start, start + size))
        start += size
    return out


@functools.cache
def _compiled_adam_steps() -> tuple[Callable[..., None], Callable[..., None]]:
    """torchao's AdamW step on one flat piece (``single_param_adam``; the piece of the param and the moments
    updated in place) compiled for quantized and for plain moments. Two functions, so two compile caches:
    quantized pieces come in a few static sizes; plain moments (norms, odd sizes) in any size, compiled once with
    a dynamic length."""
    from torchao.optim.adam import single_param_adam

    def quantized_piece(*args: Any) -> None:
        single_param_adam(*args)

    def plain_piece(*args: Any) -> None:
        single_param_adam(*args)

    return (torch.compile(quantized_piece, fullgraph=True, dynamic=False),
            torch.compile(plain_piece, fullgraph=True, dynamic=True))


_eager_reasons: dict[str, None] = {}  # why the step ran eagerly in this process (each printed once)
_compile_failed: list[BaseException] = []  # the error, once compiling the step has failed in this process


def _eager_note(why: str) -> None:
    if why not in _eager_reasons:
        _eager_reasons[why] = None
        warnings.warn(f"optimizer.state_dtype int8 / fp8 / int4: the AdamW step runs eagerly ({why}), several "
                      f"times slower than compiled")


def _run_piece(quantized: bool, args: tuple) -> None:
    """One piece through the compiled step, or eagerly with one printed note when ``FTPROG_COMPILE_OPTIMIZER=0``
    or compiling has failed in this process (no C++ compiler or Triton, ...: the failure comes before the step
    runs, so nothing is half-updated)."""
    from torchao.optim.adam import single_param_adam

    if os.environ.get(COMPILE_OPTIMIZER_ENV, "1").strip() == "0":
        _eager_note(f"{COMPILE_OPTIMIZER_ENV}=0")
    elif not _compile_failed:
        import torch._dynamo

        try:  # the cache holds a kernel per piece size and dtype: bounded by the cuts, not by the model
            with torch._dynamo.utils.disable_cache_limit(), warnings.catch_warnings():
                # torchao's state classes have no stable hash for AOT autograd's cache: that cache is skipped
                warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching")
                _compiled_adam_steps()[0 if quantized else 1](*args)
            return
        except torch._dynamo.exc.TorchDynamoException as e:
            _compile_failed.append(e)
            _eager_note(f"torch.compile failed: {str(e).strip().splitlines()[0]}")
    single_param_adam(*args)


def _low_bit_adamw(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *, lr: float,
                   betas: tuple[float, float], eps: float, wd: float, t: int, inplace: bool,
                   stochastic_rounding: bool = False) -> list[Tensor]:
    """torchao's AdamW step (``torchao.optim.adam.single_param_adam``, compiled) on each param, in flat pieces of
    a few fixed sizes (see :func:`_low_bit_cuts`) so the compiled kernels are reused and its fp32 temporaries
    stay small. The math is elementwise and the quantization block-wise, so the pieces give what one call on
    the whole tensor gives. ``stochastic_rounding``: torchao's own for bf16 params (``bf16_stochastic_round``,
    random bits drawn from torch's generator, which a checkpoint saves)."""
    lr_t = torch.tensor(lr, dtype=torch.float32)  # as torchao keeps them (tensors): no recompile when they change
    step = torch.tensor(float(t))
    out = []
    for p, g, m, v in zip(ps, gs, ms, vs):
        q = p.clone(memory_format=torch.contiguous_format) if not inplace or not p.is_contiguous() else p
        g = g.contiguous()
        quantized = _is_quantized_state(m)
        for sl in _low_bit_cuts(q.numel(), m.block_size if quantized else 0):
            _run_piece(quantized, (q.view(-1)[sl], g.view(-1)[sl], step, _state_piece(m, sl), _state_piece(v, sl),
                                   None, lr_t, betas[0], betas[1], wd, eps, True,
                                   stochastic_rounding and q.dtype == torch.bfloat16))
        if inplace and q is not p:
            p.copy_(q)
            q = p
        out.append(q)
    return out


def adamw(lr: LearningRate, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0, fused: bool | None = None,
          state_dtype: torch.dtype | str | None = None, stochastic_rounding: bool = False) -> AdamW:
    """AdamW with decoupled weight decay (``p *= 1 - lr * weight_decay`` before the Adam step).

    ``lr`` is a float or a schedule ``step -> lr``. ``fused=None`` uses torch's
    fused kernel (``torch._fused_adamw_``) where it exists for the device
    (CUDA and CPU in recent torch) and the foreach ops otherwise; ``True``
    insists on the kernel (an error where it is missing), ``False`` always
    uses the foreach ops. Both reproduce ``torch.optim.AdamW`` with the same
    setting bit for bit on fp32 params; they differ from each other by
    rounding only.

    ``state_dtype``: the dtype of the moments (default fp32, fp64 for fp64
    params), or ``"int8"`` / ``"fp8"`` / ``"int4"`` (:data:`LOW_BIT_STATES`): torchao's block-quantized
    moments, 2 bytes per parameter plus a scale per 256 (int4: 1 byte plus a scale per 128), updated by
    torchao's AdamW step compiled with ``torch.compile`` (equal to ``torchao.optim.AdamW8bit`` / ``AdamWFp8`` /
    ``AdamW4bit``, which compile it too, bit for bit; the first update
    compiles a kernel per piece size, seconds each). With ``FTPROG_COMPILE_OPTIMIZER=0``, or where compiling
    fails (no C++ compiler), the step runs eagerly after one printed note: several times slower, equal to
    their step run eagerly, which differs from the compiled one by last-bit rounding. ``"bfloat16"`` halves
    the optimizer memory of a bf16 model (4 instead of 8 bytes per parameter) and lets the fused kernel work
    on the params directly: it then equals ``torch.optim.AdamW(fused=True)`` on bf16 params bit for bit (each
    element computed in fp32, stored rounded).

    ``stochastic_rounding``: bf16 params (and bf16 moments) get each update computed in fp32 and rounded to
    bf16 stochastically instead of to nearest (:func:`_round_stochastic`), so updates smaller than half a
    bf16 step still move a weight on average instead of being lost. The random bits come from the update's
    number and the param's name (a resumed run draws the same ones); with int8 / fp8 / int4 moments torchao's
    ``bf16_stochastic_round`` does it. fp32 params and fp32 moments are unaffected.
    """
    lr = _check_lr(lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = _check_number("betas[0]", betas[0], low=0.0, high=1.0)
    b2 = _check_number("betas[1]", betas[1], low=0.0, high=1.0)
    eps = _check_number("eps", eps)
    weight_decay = _check_number("weight_decay", weight_decay)
    if fused not in (None, True, False):
        raise ValueError(f"fused must be None, True or False, got {fused!r}")
    return AdamW(lr, (b1, b2), eps, weight_decay, fused, _check_state_dtype(state_dtype, low_bit=True),
                 _check_bool("stochastic_rounding", stochastic_rounding))


# --------------------------------------------------------------------------- SGD


@attrs.frozen
class SGDState:
    """SGD state: ``count`` updates applied so far and fp32 momentum buffers (empty without momentum)."""

    count: int
    momentum: dict[str, Tensor]


@attrs.frozen
class SGD:
    """SGD with optional (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD`` (dampening 0).

    Built by :func:`sgd`, which validates the hyper-parameters.
    """

    lr: LearningRate
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    state_dtype: torch.dtype | None = None
    stochastic_rounding: bool = False

    def init(self, params: Params) -> SGDState:
        """Zero fp32 momentum buffers (none when ``momentum == 0``), count 0.

        A zero buffer makes the first step ``buf = 0 * momentum + grad = grad``,
        exactly torch's "buffer starts as a copy of the first gradient".
        """
        return SGDState(0, _zeros(params, self.state_dtype) if self.momentum != 0 else {})

    def lr_at(self, count: int) -> float:
        """The learning rate of the update applied when ``state.count == count``."""
        return _lr_at(self.lr, count)

    @torch.no_grad()
    def update(self, grads: Params, state: SGDState, params: Params, *,
               inplace: bool = False) -> tuple[dict[str, Tensor], SGDState]:
        """One SGD step: ``(new_params, new_state)``; see the module docstring for what is mutated."""
        keys, ps, gs = _lists(grads, params)
        bufs = _state_list("momentum", state.momentum, keys, ps) if self.momentum != 0 else None
        lr = self.lr_at(state.count)
        mu, wd, nesterov = self.momentum, self.weight_decay, self.nesterov

        def kernel(p: list[Tensor], g: list[Tensor], s: list[list[Tensor]], in_place: bool) -> list[Tensor]:
            d = torch._foreach_add(g, p, alpha=wd) if wd != 0 else g
            if s:
                (b,) = s
                torch._foreach_mul_(b, mu)
                torch._foreach_add_(b, d, alpha=1)
                d = torch._foreach_add(d, b, alpha=mu) if nesterov else b
            if in_place:
                torch._foreach_add_(p, d, alpha=-lr)
                return p
            return torch._foreach_add(p, d, alpha=-lr)

        dither = _dither_seeds(keys, state.count) if self.stochastic_rounding else None
        new = _apply(kernel, ps, gs, [bufs] if bufs is not None else [], inplace, dither)
        return dict(zip(keys, new)), SGDState(state.count + 1, dict(state.momentum))


def sgd(lr: LearningRate, *, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        state_dtype: torch.dtype | str | None = None, stochastic_rounding: bool = False) -> SGD:
    """Stochastic gradient descent; ``weight_decay`` is L2 (added to the gradient), as in ``torch.optim.SGD``.

    ``state_dtype``: dtype of the momentum buffers (default fp32, fp64 for fp64 params).
    ``stochastic_rounding``: as for :func:`adamw`.
    """
    lr = _check_lr(lr)
    momentum = _check_number("momentum", momentum, low=0.0, high=1.0, high_open=False)
    weight_decay = _check_number("weight_decay", weight_decay)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0")
    return SGD(lr, momentum, weight_decay, bool(nesterov), _check_state_dtype(state_dtype),
               _check_bool("stochastic_rounding", stochastic_rounding))


# --------------------------------------------------------------------------- gradient clipping


@torch.no_grad()
def clip_by_global_norm(grads: Params, max_norm: float, *,
                        inplace: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Scale ``grads`` so their joint L2 norm is at most ``max_norm``: ``(clipped, total_norm)``.

    Same math as ``torch.nn.utils.clip_grad_norm_`` (per-tensor foreach norms,
    the norm of those, scale ``min(1, max_norm / (total_norm + 1e-6))``) but it
    returns new tensors unless ``inplace=True``. ``total_norm`` is a 0-d fp32
    tensor on the device of the first grad (norms of bf16/fp16 grads are
    accumulated in fp32). Nothing here synchronises with the device: a
    non-finite ``total_norm`` is returned as it is (and the clipped grads are
    then non-finite too), so check ``torch.isfinite(total_norm)`` and skip the
    update if you need to.
    """
    max_norm = _check_number("max_norm", max_norm, low=0.0, low_open=True)
    keys = list(grads)
    gs = [grads[k] for k in keys]
    if not gs:
        return {}, torch.zeros((), dtype=torch.float32)
    first = gs[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(gs):
        groups.setdefault((g.device, g.dtype), []).append(i)
    sharded = [g for g in gs if is_dtensor(g)]
    if sharded:  # norms of the local shards, combined over the ranks: sqrt(all_reduce(sum of squares))
        import torch.distributed as dist

        squares = sum(g.to_local().float().pow(2).sum() for g in sharded)
        dist.all_reduce(squares, group=sharded[0].device_mesh.get_group())
        plain = [g for g in gs if not is_dtensor(g)]
        squares = squares + sum(g.float().pow(2).sum() for g in plain)
        total = squares.sqrt().to(torch.float32)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        out = {k: type(g).from_local(g.to_local() * coef.to(g.dtype), g.device_mesh, g.placements, shape=g.shape,
                                     stride=g.stride()) if is_dtensor(g) else g * coef.to(g.dtype)
               for k, g in zip(keys, gs)}
        return out, total
    norms: list[Tensor] = []
    for (_, dtype), idx in groups.items():
        if dtype in (torch.float32, torch.float64):
            group_norms = torch._foreach_norm([gs[i] for i in idx], 2.0)
        else:  # fp32 norms of cache-sized pieces (a whole-tensor upcast would page-fault fresh memory)
            group_norms = [n for bucket in _buckets(idx, [gs], _UPCAST_NUMEL, split=True)
                           for n in torch._foreach_norm([_piece(gs[i], sl) for i, sl in bucket], 2.0,
                                                        dtype=torch.float32)]
        norms.extend(n.to(first) for n in group_norms)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0).to(torch.float32)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    out: list[Tensor | None] = [None] * len(gs)
    for (device, _), idx in groups.items():
        group = [gs[i] for i in idx]
        c = coef.to(device)
        if inplace:
            torch._foreach_mul_(group, c)
            res = group
        else:  # 0-d low-precision grads would promote to fp32: keep each grad's dtype
            res = [r if r.dtype == g.dtype else r.to(g.dtype) for r, g in zip(torch._foreach_mul(group, c), group)]
        for i, r in zip(idx, res):
            out[i] = r
    return dict(zip(keys, out)), total  # type: ignore[arg-type]


# --------------------------------------------------------------------------- state (de)serialisation


def _buffer_fields(state: Any) -> list[str]:
    if not attrs.has(type(state)):
        raise TypeError(f"expected an optimizer state (AdamWState, SGDState, ...), got {type(state).__name__}")
    names = [f.name for f in attrs.fields(type(state))]
    if "count" not in names:
        raise TypeError(f"{type(state).__name__} has no 'count' field")
    return [n for n in names if n != "count"]


def restrict(state: Any, paths: Iterable[str]) -> Any:
    """``state`` for the params ``paths`` only, sharing their buffers (an update of it updates ``state``'s): for
    updating params one at a time, as the optimizer-in-backward step does. The count is ``state``'s."""
    keep = set(paths)
    return attrs.evolve(state, **{name: {k: t for k, t in getattr(state, name).items() if k in keep}
                                  for name in _buffer_fields(state)})


def state_dict(state: Any) -> dict[str, Tensor]:
    """Flat ``{"count": int64 0-d, "<buffer>.<param path>": tensor}`` view of an optimizer state (a quantized
    moment as its inner tensors, ``"<buffer>.<param path>.codes"`` and ``.scale``, ...).

    The tensors are the state's own buffers (no copy): save them (e.g. with
    ``safetensors.torch.save_file``) before the next ``update``.
    """
    return {"count": torch.tensor(state.count, dtype=torch.int64), **_flat_buffers(state)}


def _flat_buffers(state: Any) -> dict[str, Tensor]:
    """``{"<buffer>.<param path>": tensor}``; a quantized moment by its inner tensors
    (``"<buffer>.<param path>.codes"``, ``.scale``, ...)."""
    out = {}
    for name in _buffer_fields(state):
        for path, t in getattr(state, name).items():
            if _is_quantized_state(t):
                out.update({f"{name}.{path}.{inner}": getattr(t, inner) for inner in t.__tensor_flatten__()[0]})
            else:
                out[f"{name}.{path}"] = t
    return out


def load_state_dict(opt: Optimizer, params: Params, d: Mapping[str, Tensor]) -> Any:
    """Rebuild the state of ``opt`` for ``params`` from :func:`state_dict` output.

    The buffers are copied into fresh tensors on the params' devices (``d`` is
    not kept); missing, unexpected, mis-shaped or wrongly typed entries are
    errors, so a resumed run continues exactly where the saved one stopped.
    """
    template = opt.init(params)
    if "count" not in d:
        raise ValueError("optimizer state dict has no 'count' entry")
    count = d["count"]
    if not isinstance(count, Tensor) or count.dim() != 0 or count.dtype.is_floating_point or count.item() < 0:
        raise ValueError(f"optimizer state 'count' must be a 0-d non-negative integer tensor, got {count!r}")
    expected = _flat_buffers(template)
    missing = [k for k in expected if k not in d]
    extra = [k for k in d if k != "count" and k not in expected]
    if missing or extra:
        raise ValueError(f"optimizer state dict does not match {type(opt).__name__} on these params: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for key, dst in expected.items():
        src = d[key]
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise ValueError(f"optimizer state {key!r} is {src.dtype}{list(src.shape)}, "
                             f"expected {dst.dtype}{list(dst.shape)}")
        if is_dtensor(dst):  # a full tensor from a checkpoint: keep this rank's shard of it
            from torch.distributed.tensor import distribute_tensor

            src = distribute_tensor(src, dst.device_mesh, dst.placements)
        dst.copy_(src)
    return attrs.evolve(template, count=int(count.item()))


# --------------------------------------------------------------------------- schedules


@attrs.frozen
class _WarmupSchedule:
    """Linear warmup from 0, then constant / linear / cosine decay to ``final_lr`` (transformers' formulas)."""

    kind: str
    lr: float
    total_steps: int
    warmup_steps: int
    final_lr: float

    def __call__(self, step: int) -> float:
        step = int(step)
        if step < 0:
            raise ValueError(f"schedule step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.lr * (float(step) / float(max(1, self.warmup_steps)))
        if self.kind == "constant":
            return self.lr * 1.0
        span = float(max(1, self.total_steps - self.warmup_steps))
        if self.kind == "linear":
            factor = max(0.0, float(self.total_steps - step) / span)
        else:
            progress = min(1.0, float(step - self.warmup_steps) / span)
            factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
        if self.final_lr == 0.0 or self.lr == 0.0:
            return self.lr * factor
        # as transformers' get_cosine_with_min_lr_schedule_with_warmup(min_lr=final_lr)
        rate = self.final_lr / self.lr
        return self.lr * (factor * (1 - rate) + rate)


def _schedule(kind: str, lr: float, total_steps: int, warmup_steps: int, final_lr: float) -> Schedule:
    lr = _check_number("lr", lr)
    warmup_steps = _check_int("warmup_steps", warmup_steps)
    final_lr = _check_number("final_lr", final_lr)
    if kind != "constant":
        total_steps = _check_int("total_steps", total_steps, low=1)
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
        if final_lr > lr:
            raise ValueError(f"final_lr ({final_lr}) must be <= lr ({lr})")
    return _WarmupSchedule(kind, lr, total_steps, warmup_steps, final_lr)


def constant(lr: float, warmup_steps: int = 0) -> Schedule:
    """``lr`` after a linear warmup from 0 (transformers' ``get_constant_schedule_with_warmup``)."""
    return _schedule("constant", lr, 0, warmup_steps, 0.0)


def linear(lr: float, total_steps: int, warmup_steps: int = 0, final_lr: float = 0.0) -> Schedule:
    """Warmup from 0 to ``lr``, then linear decay to ``final_lr`` at ``total_steps``
    (transformers' ``get_linear_schedule_with_warmup`` when ``final_lr == 0``)."""
    return _schedule("linear", lr, total_steps, warmup_steps, final_lr)


def cosine(lr: float, total_steps: int, warmup_steps: int = 0, final_lr: float = 0.0) -> Schedule:
    """Warmup from 0 to ``lr``, then half-cosine decay to ``final_lr`` at ``total_steps``
    (transformers' ``get_cosine_schedule_with_warmup``, or ``get_cosine_with_min_lr_schedule_with_warmup``
    with ``min_lr=final_lr``); unlike transformers it stays at ``final_lr`` after ``total_steps``."""
    return _schedule("cosine", lr, total_steps, warmup_steps, final_lr)


_SCHEDULES: dict[str, Callable[..., Schedule]] = {"constant": constant, "linear": linear, "cosine": cosine}


def schedule_by_name(name: str, lr: float, total_steps: int, warmup_steps: int = 0,
                     final_lr: float = 0.0) -> Schedule:
    """The schedule called ``name`` (``"constant"``, ``"linear"``, ``"cosine"``), for configs.

    ``constant`` ignores ``total_steps`` and ``final_lr``.
    """
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(sorted(_SCHEDULES))}")
    if name == "constant":
        return constant(lr, warmup_steps)
    return _SCHEDULES[name](lr, total_steps, warmup_steps, final_lr)
