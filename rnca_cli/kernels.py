"""The typed boundary of the compiled CPU kernels (``_fused.c``): one checking wrapper per kernel.

The C functions take raw pointers. Every call goes through a wrapper here that checks each
tensor's device (CPU), dtype, contiguity, shape and, for index tensors, range, and raises
``ValueError`` naming the kernel and the argument, so that a mistake never reaches C as a bad
pointer. The kernels are compiled with the numbers of :mod:`rnca_cli.constants` and report them;
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


def _check(kernel: str, name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple | None = None,
           rows_at_least: int | None = None) -> None:
    """Refuse a tensor the C code would misread: not a CPU tensor of ``dtype``, not contiguous,
    not of ``shape`` (None entries match anything), or with fewer than ``rows_at_least`` rows."""
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
    if rows_at_least is not None and t.shape[0] < rows_at_least:
        raise ValueError(f"{kernel}: {name} has {t.shape[0]} rows, needs {rows_at_least}")


def _check_ids(kernel: str, name: str, t: torch.Tensor, limit: int) -> None:
    """int64 ids in [0, limit)."""
    _check(kernel, name, t, torch.int64, (None,))
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= limit):
        raise ValueError(f"{kernel}: {name} must lie in [0, {limit})")


def _grid(kernel: str, cells: int, hr: int, wr: int, k: int) -> tuple[int, int]:
    """(cells per image, blocks in all) of a buffer grid; refuses one that is not whole blocks
    plus the zero ring, or that ``cells`` does not fill."""
    core_h, core_w = hr - 2 * C.RING, wr - 2 * C.RING
    if core_h < C.BLOCK or core_w < C.BLOCK or core_h % C.BLOCK or core_w % C.BLOCK or k < 1:
        raise ValueError(f"{kernel}: a {hr}x{wr} buffer is not whole {C.BLOCK}x{C.BLOCK} blocks plus a {C.RING}-cell ring")
    if cells % (hr * wr):
        raise ValueError(f"{kernel}: {cells} cells are not whole {hr}x{wr} images")
    return hr * wr, cells // (hr * wr) * (core_h // C.BLOCK) * (core_w // C.BLOCK)


def _check_filters(kernel: str, filters: torch.Tensor, k: int) -> int:
    _check(kernel, "filters", filters, torch.float32, (None, 9, k))
    nf = filters.shape[0]
    if not 1 <= nf <= C.MAX_FILTERS or nf * k > C.MAX_FEATURES:
        raise ValueError(f"{kernel}: takes 1-{C.MAX_FILTERS} filters and at most {C.MAX_FEATURES} features, "
                         f"not {nf} x {k}")
    return nf


def select(bright: torch.Tensor, keys: torch.Tensor, inside: torch.Tensor, hr: int, wr: int, k: int,
           blocks: torch.Tensor, step: int, limit: int, fire_all: bool, fire_none: bool, todo: torch.Tensor,
           pre: torch.Tensor, counts: torch.Tensor, threads: int) -> tuple[int, int]:
    """Per block of ``blocks``: the cells to update (``todo``) and alive before the step (``pre``),
    16 bit rows each, and ``counts``. bright, inside: uint8 per buffer row; keys: int64 per buffer
    row; ``step`` is t << STEP_SHIFT, ``limit`` the fire threshold << STEP_SHIFT. Returns (cells
    to update, alive cells)."""
    n = bright.numel()
    _, nblocks = _grid("select", n, hr, wr, k)
    _check("select", "bright", bright, torch.uint8, (n,))
    _check("select", "keys", keys, torch.int64, (n,))
    _check("select", "inside", inside, torch.uint8, (n,))
    _check_ids("select", "blocks", blocks, nblocks)
    nb = len(blocks)
    _check("select", "todo", todo, torch.int32, (None, C.BLOCK), nb)
    _check("select", "pre", pre, torch.int32, (None, C.BLOCK), nb)
    _check("select", "counts", counts, torch.int64, (None,), nb)
    return _fused.select(bright.data_ptr(), keys.data_ptr(), inside.data_ptr(), hr, wr, k, blocks.data_ptr(), nb,
                         step, limit, int(fire_all), int(fire_none), todo.data_ptr(), pre.data_ptr(),
                         counts.data_ptr(), threads)


def gather(flat: torch.Tensor, patches: torch.Tensor, filters: torch.Tensor, hr: int, wr: int,
           blocks: torch.Tensor, todo: torch.Tensor, counts: torch.Tensor, m: int, x: torch.Tensor,
           states: torch.Tensor, rows: torch.Tensor, threads: int) -> None:
    """The MLP input rows ``x`` (m, F*K + P), ``states`` (m, K) and buffer ``rows`` (m,) of the
    ``m`` cells that :func:`select` chose (``counts`` per block), block by block."""
    n, k = flat.shape
    _, nblocks = _grid("gather", n, hr, wr, k)
    _check("gather", "flat", flat, torch.float32, (n, k))
    _check("gather", "patches", patches, torch.float32, (n, None))
    nf = _check_filters("gather", filters, k)
    _check_ids("gather", "blocks", blocks, nblocks)
    nb = len(blocks)
    _check("gather", "todo", todo, torch.int32, (None, C.BLOCK), nb)
    _check("gather", "counts", counts, torch.int64, (None,), nb)
    if int(counts[:nb].sum()) != m:
        raise ValueError(f"gather: the blocks' counts add up to {int(counts[:nb].sum())}, not {m}")
    _check("gather", "x", x, torch.float32, (None, nf * k + patches.shape[1]), m)
    _check("gather", "states", states, torch.float32, (None, k), m)
    _check("gather", "rows", rows, torch.int64, (None,), m)
    _fused.gather(flat.data_ptr(), patches.data_ptr(), patches.shape[1], filters.data_ptr(), nf, hr, wr, k,
                  blocks.data_ptr(), nb, todo.data_ptr(), counts.data_ptr(), x.data_ptr(), states.data_ptr(),
                  rows.data_ptr(), threads)


def scatter(flat: torch.Tensor, bright: torch.Tensor, inside: torch.Tensor, hr: int, wr: int,
            blocks: torch.Tensor, states: torch.Tensor, rows: torch.Tensor, pre: torch.Tensor, thr: float,
            keep: torch.Tensor, flags: torch.Tensor, reach: torch.Tensor, threads: int) -> None:
    """Write the new ``states`` at buffer ``rows`` and their bright flags, clear the blocks' cells
    not alive before (``pre``) and after, and set ``reach`` (zeroed by the caller) for the blocks
    the next step can change. ``keep`` and ``flags`` are scratch."""
    n, k = flat.shape
    _, nblocks = _grid("scatter", n, hr, wr, k)
    _check("scatter", "flat", flat, torch.float32, (n, k))
    _check("scatter", "bright", bright, torch.uint8, (n,))
    _check("scatter", "inside", inside, torch.uint8, (n,))
    _check_ids("scatter", "blocks", blocks, nblocks)
    nb, m = len(blocks), len(rows)
    _check("scatter", "states", states, torch.float32, (None, k), m)
    _check_ids("scatter", "rows", rows, n)
    _check("scatter", "pre", pre, torch.int32, (None, C.BLOCK), nb)
    _check("scatter", "keep", keep, torch.int32, (None, C.BLOCK), nb)
    _check("scatter", "flags", flags, torch.uint8, (None, 9), nb)
    _check("scatter", "reach", reach, torch.bool, (nblocks,))
    _fused.scatter(flat.data_ptr(), bright.data_ptr(), inside.data_ptr(), hr, wr, k, blocks.data_ptr(), nb,
                   states.data_ptr(), rows.data_ptr(), m, pre.data_ptr(), thr, keep.data_ptr(), flags.data_ptr(),
                   reach.data_ptr(), threads)


def _check_rows(kernel: str, cells: torch.Tensor, rows: torch.Tensor, filters: torch.Tensor) -> int:
    """Checks of the training kernels: cells (B, H, W, K) float32, rows pixel ids ascending."""
    _check(kernel, "cells", cells, torch.float32, (None, None, None, None))
    _check_ids(kernel, "rows", rows, cells.shape[0] * cells.shape[1] * cells.shape[2])
    if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError(f"{kernel}: rows must ascend")
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
