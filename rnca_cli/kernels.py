"""The typed boundary of the compiled CPU kernels (``_fused.c``): one checking wrapper per kernel.

The C functions take raw pointers. Every call goes through a wrapper here that checks each
tensor's device (CPU), dtype, contiguity and shape, and raises ``ValueError`` naming the kernel
and the argument, so that a mistake never reaches C as a bad pointer; the C code checks the index
values (block ids, rows) before using them. The step kernels' buffers are checked once per
rollout (:class:`StepKernels`). The kernels are compiled with the numbers of :mod:`rnca_cli.constants` and report them;
a build from other numbers is not used. :func:`status` says whether the kernels can run, and why
not.
"""

from __future__ import annotations

import os

import torch

from . import constants as C

try:
    from . import _fused
except ImportError as error:  # not built: no C compiler at install time
    _fused, _missing = None, f"not built ({error}); reinstall with a C compiler"
else:
    _expected = {"BLOCK": C.BLOCK, "RING": C.RING, "MAX_FEATURES": C.MAX_FEATURES, "MAX_FILTERS": C.MAX_FILTERS,
                 "MIX1": C.MIX1, "MIX2": C.MIX2, "STEP_SHIFT": C.STEP_SHIFT}
    _built = _fused.constants() if hasattr(_fused, "constants") else {}
    _missing = "" if _built == _expected else "built from other constants than rnca_cli/constants.py; reinstall rnca"
    if _missing:
        _fused = None


def status() -> str | None:
    """None when the kernels can run; else why not (not built, switched off with RNCA_FUSED=0)."""
    if os.environ.get("RNCA_FUSED", "1") == "0":
        return "switched off (RNCA_FUSED=0)"
    return _missing or None


def openmp() -> bool:
    """Whether the kernels were built with OpenMP (run on PyTorch's threads)."""
    return _fused is not None and bool(_fused.openmp())


def _check(kernel: str, name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple | None = None) -> None:
    """Refuse a tensor the C code would misread: not a CPU tensor of ``dtype``, not contiguous, or
    not of ``shape`` (None entries match anything)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{kernel}: {name} must be a tensor, not {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{kernel}: {name} must be on the CPU, not {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{kernel}: {name} must be {dtype}, not {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{kernel}: {name} must be contiguous")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{kernel}: {name} must have shape {want}, not {tuple(t.shape)}")


def _grid(kernel: str, cells: int, hr: int, wr: int, k: int) -> int:
    """Blocks in a buffer grid of ``cells`` rows; refuses one that is not whole blocks plus the
    zero ring, or that ``cells`` does not fill."""
    core_h, core_w = hr - 2 * C.RING, wr - 2 * C.RING
    if core_h < C.BLOCK or core_w < C.BLOCK or core_h % C.BLOCK or core_w % C.BLOCK or k < 1:
        raise ValueError(f"{kernel}: a {hr}x{wr} buffer is not whole {C.BLOCK}x{C.BLOCK} blocks plus a {C.RING}-cell ring")
    if cells % (hr * wr):
        raise ValueError(f"{kernel}: {cells} cells are not whole {hr}x{wr} images")
    return cells // (hr * wr) * (core_h // C.BLOCK) * (core_w // C.BLOCK)


def _check_filters(kernel: str, filters: torch.Tensor, k: int) -> int:
    _check(kernel, "filters", filters, torch.float32, (None, 9, k))
    nf = filters.shape[0]
    if not 1 <= nf <= C.MAX_FILTERS or nf * k > C.MAX_FEATURES:
        raise ValueError(f"{kernel}: takes 1-{C.MAX_FILTERS} filters and at most {C.MAX_FEATURES} features, "
                         f"not {nf} x {k}")
    return nf


class StepKernels:
    """The three kernels of one inference step (select, gather, scatter) on the buffers of one
    rollout. The buffers are checked once here and held; each call checks only what changes from
    step to step. The C code checks the index values it is given (block ids and rows in range,
    the chosen rows within the outputs), a pass over a few numbers next to the work.

    flat (N, K) float32: the state, one row per buffer cell of a (B, hr, wr) grid; bright, inside
    (N,) uint8; keys (N,) int64; patches (N, P) float32; filters (F, 9, K) float32; per block of
    the grid: todo, pre, keep (nblocks, 16) int32 bit rows, flags (nblocks, 9) uint8, counts
    (nblocks,) int64 scratch, and reach (nblocks,) bool.
    """

    def __init__(self, flat, bright, keys, inside, patches, filters, hr: int, wr: int, todo, pre, keep, flags,
                 counts, reach):
        if not isinstance(flat, torch.Tensor) or flat.dim() != 2:
            raise ValueError("StepKernels: flat must be a (cells, channels) tensor")
        n, k = flat.shape
        self.nblocks = _grid("StepKernels", n, hr, wr, k)
        for name, t, dtype, shape in [
            ("flat", flat, torch.float32, (n, k)), ("bright", bright, torch.uint8, (n,)),
            ("keys", keys, torch.int64, (n,)), ("inside", inside, torch.uint8, (n,)),
            ("patches", patches, torch.float32, (n, None)), ("todo", todo, torch.int32, (self.nblocks, C.BLOCK)),
            ("pre", pre, torch.int32, (self.nblocks, C.BLOCK)), ("keep", keep, torch.int32, (self.nblocks, C.BLOCK)),
            ("flags", flags, torch.uint8, (self.nblocks, 9)), ("counts", counts, torch.int64, (self.nblocks,)),
            ("reach", reach, torch.bool, (self.nblocks,)),
        ]:
            _check("StepKernels", name, t, dtype, shape)
        self.nf = _check_filters("StepKernels", filters, k)
        self.flat, self.bright, self.keys, self.inside, self.patches = flat, bright, keys, inside, patches
        self.filters, self.todo, self.pre, self.keep, self.flags = filters, todo, pre, keep, flags
        self.counts, self.reach = counts, reach
        self.hr, self.wr, self.k, self.n = hr, wr, k, n
        self.width = self.nf * k + patches.shape[1]  # MLP input row: [perception, patch]

    def select(self, blocks: torch.Tensor, step: int, limit: int, fire_all: bool, fire_none: bool,
               threads: int) -> tuple[int, int]:
        """Per block of ``blocks``: the cells to update (``todo``) and alive before the step
        (``pre``), and ``counts``. ``step`` is t << STEP_SHIFT, ``limit`` the fire threshold <<
        STEP_SHIFT. Returns (cells to update, alive cells)."""
        _check("select", "blocks", blocks, torch.int64, (None,))
        return _fused.select(self.bright.data_ptr(), self.keys.data_ptr(), self.inside.data_ptr(), self.hr, self.wr,
                             self.k, blocks.data_ptr(), len(blocks), step, limit, int(fire_all), int(fire_none),
                             self.todo.data_ptr(), self.pre.data_ptr(), self.counts.data_ptr(), threads, self.n)

    def gather(self, blocks: torch.Tensor, x: torch.Tensor, states: torch.Tensor, rows: torch.Tensor,
               threads: int) -> None:
        """The MLP input rows ``x`` (M, F*K + P), ``states`` (M, K) and buffer ``rows`` (M,) of the
        cells :meth:`select` chose, block by block; M is at least their number."""
        _check("gather", "blocks", blocks, torch.int64, (None,))
        m = len(x)
        _check("gather", "x", x, torch.float32, (m, self.width))
        _check("gather", "states", states, torch.float32, (m, self.k))
        _check("gather", "rows", rows, torch.int64, (m,))
        _fused.gather(self.flat.data_ptr(), self.patches.data_ptr(), self.patches.shape[1], self.filters.data_ptr(),
                      self.nf, self.hr, self.wr, self.k, blocks.data_ptr(), len(blocks), self.todo.data_ptr(),
                      self.counts.data_ptr(), x.data_ptr(), states.data_ptr(), rows.data_ptr(), threads, self.n, m)

    def scatter(self, blocks: torch.Tensor, states: torch.Tensor, rows: torch.Tensor, thr: float, threads: int) -> None:
        """Write the new ``states`` at buffer ``rows`` and their bright flags, clear the blocks'
        cells not alive before (``pre``) and after, and set ``reach`` (zeroed by the caller) for
        the blocks the next step can change."""
        _check("scatter", "blocks", blocks, torch.int64, (None,))
        m = len(rows)
        _check("scatter", "states", states, torch.float32, (m, self.k))
        _check("scatter", "rows", rows, torch.int64, (m,))
        _fused.scatter(self.flat.data_ptr(), self.bright.data_ptr(), self.inside.data_ptr(), self.hr, self.wr, self.k,
                       blocks.data_ptr(), len(blocks), states.data_ptr(), rows.data_ptr(), m, self.pre.data_ptr(), thr,
                       self.keep.data_ptr(), self.flags.data_ptr(), self.reach.data_ptr(), threads, self.n)


def _check_rows(kernel: str, cells: torch.Tensor, rows: torch.Tensor, filters: torch.Tensor) -> int:
    """Checks of the training kernels: cells (B, H, W, K) float32, rows int64 (the C code checks
    that they ascend and lie in the image)."""
    _check(kernel, "cells", cells, torch.float32, (None, None, None, None))
    _check(kernel, "rows", rows, torch.int64, (None,))
    return _check_filters(kernel, filters, cells.shape[3])


def perceive_rows(cells: torch.Tensor, rows: torch.Tensor, filters: torch.Tensor, out: torch.Tensor,
                  threads: int) -> None:
    """``out`` (M, F*K): the perception of the pixels ``rows`` (ascending) of ``cells``
    (B, H, W, K), zero outside the image; ``filters`` (F, 9, K)."""
    nf = _check_rows("perceive_rows", cells, rows, filters)
    b, h, w, k = cells.shape
    _check("perceive_rows", "out", out, torch.float32, (len(rows), nf * k))
    _fused.perceive_rows(cells.data_ptr(), b, h, w, k, rows.data_ptr(), len(rows), filters.data_ptr(), nf,
                         out.data_ptr(), threads)


def perceive_rows_backward(cells: torch.Tensor, rows: torch.Tensor, filters: torch.Tensor, grad: torch.Tensor,
                           grad_cells: torch.Tensor | None, grad_filters: torch.Tensor, threads: int) -> None:
    """Adds the gradient of :func:`perceive_rows` for ``grad`` (M, F*K) into ``grad_cells``
    (like ``cells``; None: not wanted) and ``grad_filters`` (F, 9, K), the same at any thread count."""
    nf = _check_rows("perceive_rows_backward", cells, rows, filters)
    b, h, w, k = cells.shape
    _check("perceive_rows_backward", "grad", grad, torch.float32, (len(rows), nf * k))
    if grad_cells is not None:
        _check("perceive_rows_backward", "grad_cells", grad_cells, torch.float32, tuple(cells.shape))
    _check("perceive_rows_backward", "grad_filters", grad_filters, torch.float32, (nf, 9, k))
    _fused.perceive_rows_backward(cells.data_ptr(), b, h, w, k, rows.data_ptr(), len(rows), filters.data_ptr(), nf,
                                  grad.data_ptr(), 0 if grad_cells is None else grad_cells.data_ptr(),
                                  grad_filters.data_ptr(), threads)
