"""``u2.SparseRowAdamW``: AdamW that updates only the rows a row-sparse gradient touches.

Training C2 (K x d = 500K x 1152) with ``torch.optim.AdamW`` reads and writes all 576M parameters,
both moments and a dense gradient every step although a step's ids touch a few thousand rows.
With ``u2.gathered_embedding`` the table's gradient is a sparse COO tensor of unique rows, and this
optimizer applies AdamW to exactly those rows: lazy AdamW.

Semantics for a parameter whose ``.grad`` is sparse (rows = the first dimension):
    * only the rows present in the (coalesced) gradient change: their parameters, both moments
      and their step count; every other row keeps its parameters, moments and count bit for bit;
    * each row has its own step count ``state["row_step"][row]`` (int64), the number of steps
      that touched it, and its bias correction uses that count: a row first touched at global
      step 1000 is corrected as at its own first step. So when every row is touched at every
      step the update is identical to ``torch.optim.AdamW``'s (same element-wise formula);
    * decoupled weight decay ``p *= 1 - lr * weight_decay`` is applied to touched rows only.
Parameters with dense gradients get exactly ``torch.optim.AdamW``'s single-tensor math (one step
count ``state["step"]``, as torch keeps it). Moments are float32 for float32/bf16/fp16 parameters
(float64 for float64): a bf16 parameter is updated in fp32 and rounded once per step.

Backends for the row update (``backend=`` in the constructor):
    "triton"  kernels/sparse_adamw.py, one program per (touched row, d-tile): CUDA, or CPU under
              TRITON_INTERPRET=1 (tests);
    "torch"   ``index_select`` the touched rows, update them with vectorised torch ops,
              ``index_copy_`` them back;
    "native"  one compiled C loop (``_native.row_adamw_fp32``) that reads and writes each touched
              element of the parameter and both moments once, in place: fp32 CPU parameters
              (a non-contiguous one takes the torch path);
    "auto"    Triton on CUDA for float32/bf16/fp16 parameters, native for fp32 CPU parameters
              when its C loop compiles, torch otherwise.

``state_dict()`` / ``load_state_dict()`` are torch's, keeping the moments' and counts' dtypes;
learning-rate schedulers work as with any torch optimizer (``group["lr"]`` is read every step).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch

from . import _dispatch, _native


class SparseRowAdamW(torch.optim.Optimizer):
    """Lazy, row-sparse AdamW (see the module docstring for the exact semantics).

    Args:
        params: iterable of parameters or of param-group dicts, as for any torch optimizer.
        lr: learning rate (read from each group at every step, so schedulers apply).
        betas: (beta1, beta2) moment decay rates, each in [0, 1).
        eps: added to the bias-corrected second-moment root.
        weight_decay: decoupled weight decay (AdamW), applied only to the rows a step touches.
        backend: "auto" | "triton" | "torch" | "native" for the sparse row update.

    Raises:
        ValueError: a hyper-parameter out of range or an unknown backend (at construction); at
            ``step()``, a sparse gradient that is not row-sparse or does not match its parameter.
        TypeError: a non-float parameter, or backend "triton" for float64.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        backend: str = "auto",
    ):
        if not 0.0 <= float(lr):
            raise ValueError(f"invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"invalid epsilon value: {eps}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay value: {weight_decay}")
        _dispatch.check_backend("sparse_adamw", backend)
        self.backend = backend
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        # per-parameter (rows, d) scratch of the torch row update, reused from step to step: fresh
        # (U, d) temporaries cost a page fault per 4 KiB each step (most of the step's time at
        # K = 500K, d = 1152, U = 1,740 on the CPU). Not part of the state dict.
        self._workspace: Dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimisation step over every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            the closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not param.is_floating_point():
                    raise TypeError(f"SparseRowAdamW updates float parameters, got dtype {param.dtype}")
                state = self.state[param]
                if param.grad.is_sparse:
                    self._sparse_step(param, param.grad, state, hyper)
                elif "row_step" in state:
                    # a dense gradient touches every row: the row update of all rows is AdamW
                    rows = param.shape[0]
                    all_rows = torch.arange(rows, device=param.device)
                    self._row_step(param, all_rows, param.grad.reshape(rows, -1), state, hyper)
                else:
                    _dense_adamw(param, param.grad, state, **hyper)
        return loss

    def _sparse_step(self, param: torch.Tensor, grad: torch.Tensor, state: Dict[str, Any], hyper: dict) -> None:
        if grad.sparse_dim() != 1 or param.dim() == 0:
            raise ValueError(
                f"SparseRowAdamW needs row-sparse gradients (one sparse dimension, the rows), got "
                f"sparse_dim={grad.sparse_dim()} for a parameter of shape {tuple(param.shape)}"
            )
        if grad.shape != param.shape:
            raise ValueError(f"sparse gradient shape {tuple(grad.shape)} != parameter shape {tuple(param.shape)}")
        # checked before coalescing (torch's coalesce corrupts the heap on a negative id) and
        # before any state changes, on every backend: the Triton kernel would write beyond the
        # parameter, index_add_ raise a bare IndexError (a device-side assert on CUDA)
        raw_ids = grad._indices()[0]
        if raw_ids.numel():
            low, high = (int(v) for v in torch.aminmax(raw_ids))
            if low < 0 or high >= param.shape[0]:
                raise ValueError(
                    f"the sparse gradient of a parameter with {param.shape[0]} rows holds row ids from {low} to "
                    f"{high}; row ids must lie in [0, {param.shape[0]})"
                )
        # autograd drops the coalesced flag when it stores a sparse grad, and accumulating two
        # backward passes concatenates their entries: coalescing sums duplicates, sorts the ids.
        # Ids that are already strictly ascending (u2.gathered_embedding's, one backward) are
        # used as they are: coalescing them would copy every value row for nothing
        if not grad.is_coalesced() and not _strictly_ascending(raw_ids):
            grad = grad.coalesce()
        row_ids = grad._indices()[0]
        if row_ids.numel() == 0:
            return  # no row touched (e.g. a rank's shard of a table no id of the step fell in): no change
        values = grad._values()
        self._row_step(param, row_ids, values.reshape(values.shape[0], -1), state, hyper)

    def _row_step(
        self, param: torch.Tensor, row_ids: torch.Tensor, grad_rows: torch.Tensor, state: Dict[str, Any], hyper: dict
    ) -> None:
        # row_ids: (U,) unique, grad_rows: (U, d) with d = the product of param.shape[1:]
        rows = param.shape[0]
        _init_state(param, state)
        if "row_step" not in state:
            # a new state starts every row at 0; one from dense steps so far has that count on every row
            count = int(state.pop("step").item()) if "step" in state else 0
            state["row_step"] = torch.full((rows,), count, dtype=torch.int64, device=param.device)
        row_step = state["row_step"]
        row_step.index_add_(0, row_ids, torch.ones((), dtype=torch.int64, device=param.device).expand_as(row_ids))
        param2d = param.view(rows, -1)
        exp_avg, exp_avg_sq = state["exp_avg"].view(rows, -1), state["exp_avg_sq"].view(rows, -1)
        backend = self.backend_for(param)
        if backend == "triton":
            from .kernels import sparse_adamw as kernel  # first use: importing the package compiles nothing

            kernel.sparse_adamw_triton(param2d, row_ids, grad_rows, exp_avg, exp_avg_sq, row_step, **hyper)
        elif backend == "native" and all(t.is_contiguous() and t.dtype == torch.float32 for t in (exp_avg, exp_avg_sq)):
            # (moments loaded from a float64 run keep their dtype: those take the torch path)
            _row_adamw_native(param2d, row_ids, grad_rows, exp_avg, exp_avg_sq, row_step, **hyper)
        else:
            _row_adamw_torch(param2d, row_ids, grad_rows, exp_avg, exp_avg_sq, row_step,
                             workspace=self._scratch(param, row_ids.shape[0], exp_avg), **hyper)

    def backend_for(self, param: torch.Tensor) -> str:
        """The implementation that updates ``param``'s touched rows: "triton", "native" or "torch"."""
        backend = _dispatch.resolve("sparse_adamw", self.backend, param.device, (param.dtype,))
        if backend == "native" and not (param.is_contiguous() and _moment_dtype(param) == torch.float32):
            return "torch"
        return backend

    def _scratch(self, param: torch.Tensor, n_rows: int, like: torch.Tensor) -> torch.Tensor:
        """(5, >= n_rows, d) scratch for ``param``'s row update, grown by half when too small."""
        d = like.shape[1]
        scratch = self._workspace.get(id(param))
        if scratch is None or scratch.shape[1] < n_rows or scratch.shape[2] != d or scratch.device != like.device:
            rows = max(n_rows, int(1.5 * scratch.shape[1]) if scratch is not None else n_rows)
            scratch = self._workspace[id(param)] = torch.empty((5, rows, d), dtype=like.dtype, device=like.device)
        return scratch

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping the saved dtypes of the moments and row counts.

        torch casts every floating state tensor except "step" to its parameter's dtype: that
        would round the fp32 moments of a bf16 parameter to bf16 and turn the int64 per-row step
        counts into floats.
        """
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for pid, param in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if key != "step" and isinstance(value, torch.Tensor):
                    self.state[param][key] = value.to(device=param.device)


def _strictly_ascending(ids: torch.Tensor) -> bool:
    """Whether the 1-D ``ids`` are sorted with no repeats (then they are already coalesced)."""
    return ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all())


def _moment_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


def _init_state(param: torch.Tensor, state: Dict[str, Any]) -> None:
    if "exp_avg" not in state:
        dtype = _moment_dtype(param)
        state["exp_avg"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
        state["exp_avg_sq"] = torch.zeros(param.shape, dtype=dtype, device=param.device)


def _dense_adamw(
    param: torch.Tensor, grad: torch.Tensor, state: Dict[str, Any], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """``torch.optim.AdamW``'s single-tensor step, op for op, with moments in ``_moment_dtype``."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
    _init_state(param, state)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    work = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
    grad = grad.to(exp_avg.dtype)
    state["step"] += 1
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = state["step"].item()
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    work.addcdiv_(exp_avg, denom, value=-step_size)
    if work is not param:
        param.copy_(work)


def _bias_corrections(row_step: torch.Tensor, row_ids: torch.Tensor, lr: float, beta1: float, beta2: float,
                      dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per touched row, in ``dtype``: -lr / (1 - beta1^t) and sqrt(1 - beta2^t), computed in float64
    from the rows' step counts t (which already count this step)."""
    steps = row_step.index_select(0, row_ids).to(torch.float64)
    neg_step_size = (-lr / (1 - beta1 ** steps)).to(dtype)
    bias_correction2_sqrt = (1 - beta2 ** steps).sqrt().to(dtype)
    return neg_step_size, bias_correction2_sqrt


def _row_adamw_native(
    param: torch.Tensor, row_ids: torch.Tensor, grad_rows: torch.Tensor,
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, row_step: torch.Tensor, *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """:func:`_row_adamw_torch`'s update for fp32 (K, d) tensors in one compiled pass (``_native``):
    the same formulas in the same order, each element read and written once, in place."""
    neg_step_size, bias_correction2_sqrt = _bias_corrections(row_step, row_ids, lr, beta1, beta2, torch.float32)
    _native.row_adamw_fp32(param, exp_avg, exp_avg_sq, row_ids.contiguous(),
                           grad_rows.to(torch.float32).contiguous(), neg_step_size, bias_correction2_sqrt,
                           decay=1 - lr * weight_decay, beta1=beta1, beta2=beta2, eps=eps)


def _row_adamw_torch(
    param: torch.Tensor, row_ids: torch.Tensor, grad_rows: torch.Tensor,
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, row_step: torch.Tensor, *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    workspace: Optional[torch.Tensor] = None,
) -> None:
    """AdamW on rows ``row_ids`` of ``param`` with per-row bias correction, vectorised torch ops.

    The element-wise operations are ``_dense_adamw``'s on the gathered rows, with the bias
    corrections computed per row in float64 from ``row_step`` (which already counts this step).
    ``workspace``: (5, >= U, d) scratch in the moments' dtype for the gathered rows and
    temporaries, reused across steps (allocated here when None).
    """
    # param, exp_avg, exp_avg_sq: (K, d); row_ids: (U,); grad_rows: (U, d); row_step: (K,)
    work_dtype = exp_avg.dtype
    u = row_ids.shape[0]
    if workspace is None:
        workspace = torch.empty((5, u, exp_avg.shape[1]), dtype=work_dtype, device=exp_avg.device)
    scratch = [workspace[i, :u] for i in range(5)]
    if param.dtype == work_dtype:
        rows = torch.index_select(param, 0, row_ids, out=scratch[0])
    else:
        rows = param.index_select(0, row_ids).to(work_dtype)
    grad = grad_rows.to(work_dtype)
    exp_avg_rows = torch.index_select(exp_avg, 0, row_ids, out=scratch[1])
    exp_avg_sq_rows = torch.index_select(exp_avg_sq, 0, row_ids, out=scratch[2])
    if weight_decay != 0:
        rows.mul_(1 - lr * weight_decay)
    exp_avg_rows.lerp_(grad, 1 - beta1)
    exp_avg_sq_rows.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    neg_step_size, bias_correction2_sqrt = _bias_corrections(row_step, row_ids, lr, beta1, beta2, work_dtype)
    neg_step_size, bias_correction2_sqrt = neg_step_size.unsqueeze(1), bias_correction2_sqrt.unsqueeze(1)
    denom = torch.sqrt(exp_avg_sq_rows, out=scratch[3]).div_(bias_correction2_sqrt).add_(eps)
    update = torch.mul(exp_avg_rows, neg_step_size, out=scratch[4]).div_(denom)
    # addcdiv's (value * m) / denom, with a per-row value
    rows.add_(update)
    param.index_copy_(0, row_ids, rows.to(param.dtype))
    exp_avg.index_copy_(0, row_ids, exp_avg_rows)
    exp_avg_sq.index_copy_(0, row_ids, exp_avg_sq_rows)
