/* Fused CPU kernels of rnca's ``fused`` engine. Python calls them only through the checking wrappers
 * of rnca_cli/kernels.py (read it first), which refuse a wrong dtype, device, shape or layout before
 * any pointer reaches this file; rnca_cli/engines/fused.py is the engine that uses them.
 *
 * One rNCA step on the 16x16 blocks that can change, in three calls around the MLP's GEMMs
 * (which stay in PyTorch):
 *
 *   select   per block: the alive test before the step, the update mask (splitmix64 hash), the
 *            cells whose update is needed (rnca_cli.engines.rows.needed) and that fire; counts them;
 *   gather   per block: each of those cells perceives its 3x3 neighbourhood straight from the
 *            state buffer and writes [perception, image patch, 1] as one row of the MLP input,
 *            with its own state: no perception maps, no separate gathers;
 *   scatter  the new states written back, the alive test after the update, the cells alive
 *            neither before nor after cleared, and the blocks the next step can reach.
 *
 * Results equal PyTorch's to float rounding (perception sums its nine taps in tap order, with
 * fused multiply-adds where the CPU has them).
 *
 * Cell sets of a block are bit rows: bit x of row y is cell (y, x), so a 3x3 "any" is three ORs
 * of rows and two shifts instead of nine loads per cell.
 *
 * Layout (all per *buffer row*, the index of a cell in the (B, Hr, Wr) buffer grid, which has a
 * 2-pixel zero ring around the image padded to whole blocks):
 *   buf      float32 (B*Hr*Wr, K)      the state, channels last
 *   bright   uint8   (B*Hr*Wr,)        1 where the visible channel >= the alive threshold, kept
 *                                      up to date by scatter: the alive tests read these bytes,
 *                                      not the visible channel, one value per cache line
 *   keys     int64   (B*Hr*Wr,)        update-mask hash keys (rnca_cli.model.FireNoise)
 *   inside   uint8   (B*Hr*Wr,)        1 for cells of the image proper (the rest never update)
 *   patches  float32 (B*Hr*Wr, P)      image patch and constant 1 of each cell
 *   filters  float32 (F, 9, K)         perception filter i, tap (dy, dx), channel
 * Blocks are numbered (b, by, bx); cell (y, x) of block (by, bx) is buffer cell
 * (by*16 + 2 + y, bx*16 + 2 + x). The caller allocates the per-block scratch (todo, pre, keep:
 * nb x 16 uint32 bit rows; flags: nb x 9 bytes) and the outputs. Pointers come in as integers
 * from rnca_cli/kernels.py, which has checked every tensor; the GIL is released while a kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* The shared numbers come from rnca_cli/constants.py, which setup.py passes as -DRNCA_... macros. */
#if !defined(RNCA_BLOCK) || !defined(RNCA_RING) || !defined(RNCA_MAX_FEATURES) || !defined(RNCA_MAX_FILTERS) || \
    !defined(RNCA_MIX1) || !defined(RNCA_MIX2) || !defined(RNCA_STEP_SHIFT)
#error "build through setup.py: it passes rnca_cli/constants.py to the compiler as -DRNCA_... macros"
#endif
#if RNCA_BLOCK != 16 || RNCA_RING != 2 || RNCA_MAX_FILTERS != 4
#error "a block row is kept in the bits of a uint32 with its 2-pixel margin (one step reads 2 pixels)"
#endif
#define BLOCK RNCA_BLOCK
#define RING RNCA_RING
#define FRAME (BLOCK + 2 * RING) /* a block and its margin: every cell one step of the block reads */
#define CORE ((1u << BLOCK) - 1) /* the cells of a block row */
#define MAX_FEATURES RNCA_MAX_FEATURES /* filters x channels of the generic perception */
#define MAX_FILTERS RNCA_MAX_FILTERS

/* Perception is compiled for AVX-512, AVX2 and plain x86-64, picked when the module loads
 * (GCC/Clang function multiversioning): one build runs on any x86-64 CPU and uses the widest
 * vectors it has. Elsewhere the compiler's default target is used. */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

typedef struct {
    int64_t hr, wr, k, nby, nbx;
} Grid;

/* Buffer row of cell (0, 0) of block ``id``'s frame (the block's cell (0, 0) is at (2, 2)). */
static int64_t frame_origin(const Grid *g, int64_t id) {
    int64_t per_image = g->nby * g->nbx, b = id / per_image, rest = id % per_image;
    return (b * g->hr + (rest / g->nbx) * BLOCK) * g->wr + (rest % g->nbx) * BLOCK;
}

/* Cells within one column of a set cell, in a row: the horizontal half of a 3x3 "any". */
static inline uint32_t spread(uint32_t row) { return row | (row << 1) | (row >> 1); }

/* Which of the ``n`` cells from buffer row ``row`` fire in this step, as bits:
 * rnca_cli.model.FireNoise.fires, i.e. the top bits of splitmix64(key + t*2^40) before its last
 * round are below ``limit`` = ceil(rate * 2^24) * 2^40, as unsigned numbers. Every cell is
 * hashed, without branches, so that the loop vectorises (a branch on brightness mispredicted). */
static inline uint32_t fire_bits(const int64_t *keys, int64_t row, int n, uint64_t step, uint64_t limit) {
    uint32_t out = 0;
    for (int x = 0; x < n; ++x) {
        uint64_t z = (uint64_t)keys[row + x] + step;
        z = (z ^ (z >> 30)) * RNCA_MIX1;
        z = (z ^ (z >> 27)) * RNCA_MIX2;
        out |= (uint32_t)(z < limit) << x;
    }
    return out;
}

static inline uint32_t bits(const uint8_t *flags, int from, int to) {
    uint32_t out = 0;
    for (int x = from; x < to; ++x) out |= (uint32_t)(flags[x] != 0) << x;
    return out;
}

typedef struct {
    uint64_t step, limit;
    int fire_all, fire_none;
} Rule;

/* select for one block: todo (cells to update) and pre (alive before the step), 16 bit rows
 * each; returns the number of cells to update and adds the alive cells of the image to *alive.
 *
 * needed = pre | near(pre & ~near(stable)), stable = bright & ~fire (rnca_cli.model.needed):
 * pre needs bright on the block and a 2-pixel margin, the second "near" a 1-pixel margin of
 * undecided cells. */
VECTOR_CLONES
static int64_t select_block(const Grid *g, const uint8_t *bright_cells, const int64_t *keys, const uint8_t *inside,
                            int64_t id, const Rule *rule, uint32_t *todo, uint32_t *pre_out, int64_t *alive) {
    uint32_t bright[FRAME], fire[FRAME], stable[FRAME], pre[FRAME], undecided[FRAME];
    int64_t origin = frame_origin(g, id), count = 0, live = 0;
    const uint32_t inner = ((1u << FRAME) - 1) & ~1u & ~(1u << (FRAME - 1)); /* frame columns 1..18 */
    for (int y = 0; y < FRAME; ++y) {
        int64_t row = origin + y * g->wr;
        uint32_t b = bits(bright_cells + row, 0, FRAME);
        bright[y] = b;
        fire[y] = rule->fire_none ? 0 : rule->fire_all ? (1u << FRAME) - 1 : fire_bits(keys, row, FRAME, rule->step, rule->limit);
        stable[y] = b & ~fire[y]; /* keeps a bright value whatever its neighbours do */
    }
    pre[0] = pre[FRAME - 1] = undecided[0] = undecided[FRAME - 1] = 0;
    for (int y = 1; y < FRAME - 1; ++y) {
        pre[y] = spread(bright[y - 1] | bright[y] | bright[y + 1]) & inner;
        undecided[y] = pre[y] & ~spread(stable[y - 1] | stable[y] | stable[y + 1]);
    }
    for (int y = 0; y < BLOCK; ++y) {
        int fy = y + RING;
        int64_t row = origin + fy * g->wr + RING;
        uint32_t need = ((pre[fy] | spread(undecided[fy - 1] | undecided[fy] | undecided[fy + 1])) >> RING) & CORE;
        uint32_t ins = bits(inside + row, 0, BLOCK);
        todo[y] = need & (fire[fy] >> RING) & ins;
        pre_out[y] = (pre[fy] >> RING) & CORE;
        for (uint32_t t = todo[y], p = pre_out[y] & ins; t | p; t >>= 1, p >>= 1) count += t & 1, live += p & 1;
    }
    *alive += live;
    return count;
}

/* Perception of one cell, any channel and filter count: out[i*K + c] = sum over taps of
 * filters[i][tap][c] * s(tap)[c], accumulated in a local array and stored once. */
static inline void perceive_cell(const float *restrict centre, int64_t row_stride, int nf, int k,
                                 const float *restrict filters, float *restrict out) {
    float acc[MAX_FEATURES];
    for (int i = 0; i < nf * k; ++i) acc[i] = 0.0f;
    for (int dy = -1; dy <= 1; ++dy) {
        for (int dx = -1; dx <= 1; ++dx) {
            const float *restrict s = centre + dy * row_stride + dx * k;
            const float *restrict w = filters + ((dy + 1) * 3 + dx + 1) * k;
            for (int i = 0; i < nf; ++i)
                for (int c = 0; c < k; ++c) acc[i * k + c] += w[i * 9 * k + c] * s[c];
        }
    }
    for (int i = 0; i < nf * k; ++i) out[i] = acc[i];
}

/* gather for one block, any channel count: rows m, m+1, ... of x (MLP input), states, rows. */
VECTOR_CLONES
static void gather_block(const Grid *g, const float *buf, const float *patches, int64_t np, const float *filters,
                         int nf, int64_t id, const uint32_t *todo, int64_t m, float *x, float *states,
                         int64_t *rows) {
    int64_t origin = frame_origin(g, id), k = g->k, width = nf * k + np;
    for (int y = 0; y < BLOCK; ++y) {
        for (int c = 0; c < BLOCK; ++c) {
            if (!(todo[y] >> c & 1)) continue;
            int64_t row = origin + (y + RING) * g->wr + c + RING;
            const float *centre = buf + row * k;
            float *out = x + m * width;
            perceive_cell(centre, g->wr * k, nf, (int)k, filters, out);
            for (int64_t j = 0; j < np; ++j) out[nf * k + j] = patches[row * np + j];
            for (int64_t j = 0; j < k; ++j) states[m * k + j] = centre[j];
            rows[m++] = row;
        }
    }
}

/* gather_block for 16 channels (the paper's and the shipped models'): a cell's state is one
 * 16-float vector (GCC/Clang vector extension: one AVX-512 register, two AVX2 ones), and the
 * 9 x nf filter vectors stay in registers for the whole block. Compiled once per filter count
 * (gather_block16), so that the filter loops unroll: the generic loop reloads the filters for
 * every cell. */
typedef float v16 __attribute__((vector_size(64), aligned(4))); /* unaligned loads and stores */

static inline __attribute__((always_inline)) void gather16(const Grid *g, const float *buf, const float *patches,
                                                            int64_t np, const float *filters, const int nf,
                                                            int64_t id, const uint32_t *todo, int64_t m, float *x,
                                                            float *states, int64_t *rows) {
    int64_t origin = frame_origin(g, id), width = nf * 16 + np, stride = g->wr * 16;
    v16 w[4][9];
    for (int i = 0; i < nf; ++i)
        for (int t = 0; t < 9; ++t) w[i][t] = *(const v16 *)(filters + (i * 9 + t) * 16);
    for (int y = 0; y < BLOCK; ++y) {
        for (int c = 0; c < BLOCK; ++c) {
            if (!(todo[y] >> c & 1)) continue;
            int64_t row = origin + (y + RING) * g->wr + c + RING;
            const float *centre = buf + row * 16;
            float *out = x + m * width;
            v16 acc[4] = {0};
            for (int dy = -1; dy <= 1; ++dy) {
                for (int dx = -1; dx <= 1; ++dx) {
                    v16 s = *(const v16 *)(centre + dy * stride + dx * 16);
                    for (int i = 0; i < nf; ++i) acc[i] += w[i][(dy + 1) * 3 + dx + 1] * s;
                }
            }
            for (int i = 0; i < nf; ++i) *(v16 *)(out + i * 16) = acc[i];
            for (int64_t j = 0; j < np; ++j) out[nf * 16 + j] = patches[row * np + j];
            *(v16 *)(states + m * 16) = *(const v16 *)centre;
            rows[m++] = row;
        }
    }
}

VECTOR_CLONES
static void gather_block16(const Grid *g, const float *buf, const float *patches, int64_t np, const float *filters,
                           int nf, int64_t id, const uint32_t *todo, int64_t m, float *x, float *states,
                           int64_t *rows) {
    switch (nf) {
    case 1: gather16(g, buf, patches, np, filters, 1, id, todo, m, x, states, rows); break;
    case 2: gather16(g, buf, patches, np, filters, 2, id, todo, m, x, states, rows); break;
    case 3: gather16(g, buf, patches, np, filters, 3, id, todo, m, x, states, rows); break;
    default: gather16(g, buf, patches, np, filters, 4, id, todo, m, x, states, rows); break;
    }
}

/* After the update, for one block: keep = alive before (pre) and after (its 3x3 neighbourhood,
 * neighbouring blocks' new values included, has a bright cell); and the nine reach flags, in
 * (dy, dx) order: whether a kept cell of the image can change the block itself (dy = dx = 0) or
 * its neighbour in that direction in the next step, i.e. lies within 2 pixels of that edge or in
 * that 2 x 2 corner (a step reads 2 pixels around a cell with state). */
static void keep_block(const Grid *g, const uint8_t *bright_cells, const uint8_t *inside, int64_t id,
                       const uint32_t *pre, uint32_t *keep, uint8_t *flags) {
    uint32_t bright[FRAME] = {0}, kept_rows = 0, top = 0, bottom = 0;
    int64_t origin = frame_origin(g, id);
    for (int y = 1; y < FRAME - 1; ++y) bright[y] = bits(bright_cells + origin + y * g->wr, 1, FRAME - 1);
    for (int y = 0; y < BLOCK; ++y) {
        int fy = y + RING;
        keep[y] = pre[y] & (spread(bright[fy - 1] | bright[fy] | bright[fy + 1]) >> RING);
        uint32_t held = keep[y] & bits(inside + origin + fy * g->wr + RING, 0, BLOCK);
        kept_rows |= held;
        if (y < 2) top |= held;
        if (y >= BLOCK - 2) bottom |= held;
    }
    const uint32_t rows[3] = {top, kept_rows, bottom}, cols[3] = {0x3u, CORE, 0x3u << (BLOCK - 2)};
    for (int d = 0; d < 9; ++d) flags[d] = (rows[d / 3] & cols[d % 3]) != 0;
}

/* -- training: perception of gathered cells, and its gradient ----------------------------------
 * Training differentiates rnca_cli.engines.rows.step, whose state (B, H, W, K) has no ring: cells
 * outside the image read as zero (a convolution's zero padding). Cells are pixel rows
 * p = (b*H + y)*W + x, ascending (flat_nonzero's order). */

/* Taps of pixel p inside the image, as (tap, neighbour's pixel row) pairs; returns their count. */
static inline int taps_of(int64_t p, int64_t h, int64_t w, int *tap, int64_t *at) {
    int64_t y = p / w % h, x = p % w;
    int n = 0;
    for (int dy = -1; dy <= 1; ++dy) {
        if (y + dy < 0 || y + dy >= h) continue;
        for (int dx = -1; dx <= 1; ++dx) {
            if (x + dx < 0 || x + dx >= w) continue;
            tap[n] = (dy + 1) * 3 + dx + 1, at[n++] = p + dy * w + dx;
        }
    }
    return n;
}

VECTOR_CLONES
static void perceive_rows_range(const float *state, int64_t h, int64_t w, int64_t k, const int64_t *rows,
                                int64_t from, int64_t to, const float *filters, int nf, float *out) {
    float acc[MAX_FEATURES];
    int tap[9];
    int64_t at[9];
    for (int64_t m = from; m < to; ++m) {
        int n = taps_of(rows[m], h, w, tap, at);
        for (int i = 0; i < nf * k; ++i) acc[i] = 0.0f;
        for (int j = 0; j < n; ++j) {
            const float *restrict s = state + at[j] * k;
            for (int i = 0; i < nf; ++i) {
                const float *restrict f = filters + (i * 9 + tap[j]) * k;
                for (int64_t c = 0; c < k; ++c) acc[i * k + c] += f[c] * s[c];
            }
        }
        memcpy(out + m * nf * k, acc, nf * k * sizeof(float));
    }
}

/* The gradient of perceive_rows for the rows of one image: each row's feature gradient g flows
 * to its neighbours' states (filter x g) and to the filters (g x neighbour's state). */
VECTOR_CLONES
static void perceive_rows_backward_range(const float *state, int64_t h, int64_t w, int64_t k, const int64_t *rows,
                                         int64_t from, int64_t to, const float *filters, int nf, const float *grad,
                                         float *grad_state, float *grad_filters) {
    int tap[9];
    int64_t at[9];
    for (int64_t m = from; m < to; ++m) {
        int n = taps_of(rows[m], h, w, tap, at);
        const float *restrict g = grad + m * nf * k;
        for (int j = 0; j < n; ++j) {
            const float *restrict s = state + at[j] * k;
            float *restrict gs = grad_state ? grad_state + at[j] * k : NULL;
            for (int i = 0; i < nf; ++i) {
                const float *restrict f = filters + (i * 9 + tap[j]) * k;
                float *restrict gf = grad_filters + (i * 9 + tap[j]) * k;
                const float *restrict gi = g + i * k;
                if (gs)
                    for (int64_t c = 0; c < k; ++c) gs[c] += f[c] * gi[c];
                for (int64_t c = 0; c < k; ++c) gf[c] += gi[c] * s[c];
            }
        }
    }
}

/* perceive_rows_range and perceive_rows_backward_range for 16 channels, one vector per cell
 * state, filters (and the filter gradient) in registers, compiled per filter count. */
static inline __attribute__((always_inline)) void rows16(const float *state, int64_t h, int64_t w,
                                                          const int64_t *rows, int64_t from, int64_t to,
                                                          const float *filters, const int nf, float *out,
                                                          const float *grad, float *grad_state, float *grad_filters) {
    v16 f[4][9], gf[4][9];
    for (int i = 0; i < nf; ++i)
        for (int t = 0; t < 9; ++t) f[i][t] = *(const v16 *)(filters + (i * 9 + t) * 16), gf[i][t] = (v16){0};
    for (int64_t m = from; m < to; ++m) {
        int64_t p = rows[m], y = p / w % h, x = p % w;
        v16 acc[4] = {0}, g[4] = {0};
        if (grad)
            for (int i = 0; i < nf; ++i) g[i] = *(const v16 *)(grad + (m * nf + i) * 16);
        for (int dy = -1; dy <= 1; ++dy) {
            if (y + dy < 0 || y + dy >= h) continue;
            for (int dx = -1; dx <= 1; ++dx) {
                if (x + dx < 0 || x + dx >= w) continue;
                int t = (dy + 1) * 3 + dx + 1;
                int64_t at = (p + dy * w + dx) * 16;
                v16 s = *(const v16 *)(state + at);
                if (!grad) {
                    for (int i = 0; i < nf; ++i) acc[i] += f[i][t] * s;
                    continue;
                }
                v16 back = {0};
                for (int i = 0; i < nf; ++i) back += f[i][t] * g[i], gf[i][t] += g[i] * s;
                if (grad_state) *(v16 *)(grad_state + at) += back;
            }
        }
        if (!grad)
            for (int i = 0; i < nf; ++i) *(v16 *)(out + (m * nf + i) * 16) = acc[i];
    }
    if (grad)
        for (int i = 0; i < nf; ++i)
            for (int t = 0; t < 9; ++t) *(v16 *)(grad_filters + (i * 9 + t) * 16) += gf[i][t];
}

/* Forward (grad NULL: writes out) or backward (adds into grad_state, if not NULL, and
 * grad_filters) of the perception of rows [from, to), 16 channels. */
VECTOR_CLONES
static void rows_block16(const float *state, int64_t h, int64_t w, const int64_t *rows, int64_t from, int64_t to,
                         const float *filters, int nf, float *out, const float *grad, float *grad_state,
                         float *grad_filters) {
    switch (nf) {
    case 1: rows16(state, h, w, rows, from, to, filters, 1, out, grad, grad_state, grad_filters); break;
    case 2: rows16(state, h, w, rows, from, to, filters, 2, out, grad, grad_state, grad_filters); break;
    case 3: rows16(state, h, w, rows, from, to, filters, 3, out, grad, grad_state, grad_filters); break;
    default: rows16(state, h, w, rows, from, to, filters, 4, out, grad, grad_state, grad_filters); break;
    }
}

/* -- Python interface --------------------------------------------------------------------------- */

static int parse_grid(Grid *g, long long hr, long long wr, long long k) {
    g->hr = hr, g->wr = wr, g->k = k, g->nby = (hr - 2 * RING) / BLOCK, g->nbx = (wr - 2 * RING) / BLOCK;
    if (hr < 2 * RING + BLOCK || wr < 2 * RING + BLOCK || (hr - 2 * RING) % BLOCK || (wr - 2 * RING) % BLOCK || k < 1) {
        PyErr_SetString(PyExc_ValueError, "buffer grid must be whole blocks plus the zero ring");
        return 0;
    }
    return 1;
}

/* Index checks, cheap next to the work (rnca_cli/kernels.py checks dtypes, shapes and layouts). */
static int ids_below(const int64_t *ids, long long n, long long limit, const char *what) {
    for (long long j = 0; j < n; ++j)
        if (ids[j] < 0 || ids[j] >= limit) {
            PyErr_Format(PyExc_ValueError, "%s must lie in [0, %lld)", what, limit);
            return 0;
        }
    return 1;
}

static int rows_ascend(const int64_t *rows, long long m, long long limit, const char *kernel) {
    for (long long j = 0; j < m; ++j)
        if (rows[j] < 0 || rows[j] >= limit || (j && rows[j] <= rows[j - 1])) {
            PyErr_Format(PyExc_ValueError, "%s: rows must ascend and lie in [0, %lld)", kernel, limit);
            return 0;
        }
    return 1;
}

/* Blocks in a buffer of ``cells`` rows, or -1 (an error set) when ``cells`` is not whole images. */
static long long block_count(const Grid *g, long long cells) {
    if (cells <= 0 || cells % (g->hr * g->wr)) {
        PyErr_SetString(PyExc_ValueError, "the buffer is not whole images of the grid");
        return -1;
    }
    return cells / (g->hr * g->wr) * g->nby * g->nbx;
}

PyDoc_STRVAR(select_doc,
"select(bright, keys, inside, hr, wr, k, blocks, nb, step, limit, fire_all, fire_none, todo, pre, counts,\n"
"       threads, cells) -> (cells to update, alive cells)\n\n"
"For each of the nb int64 block ids at ``blocks``: todo and pre (16 uint32 bit rows each) and\n"
"counts (int64). ``step`` is t * 2^40, ``limit`` the update-mask hash limit.");

static PyObject *py_select(PyObject *self, PyObject *args) {
    unsigned long long bright, keys, inside, blocks, todo, pre, counts;
    long long hr, wr, k, nb;
    Rule rule;
    int threads;
    Grid g;
    long long cells;
    if (!PyArg_ParseTuple(args, "KKKLLLKLKKiiKKKiL", &bright, &keys, &inside, &hr, &wr, &k, &blocks, &nb, &rule.step,
                          &rule.limit, &rule.fire_all, &rule.fire_none, &todo, &pre, &counts, &threads, &cells) ||
        !parse_grid(&g, hr, wr, k))
        return NULL;
    long long nblocks = block_count(&g, cells);
    if (nblocks < 0 || !ids_below((const int64_t *)blocks, nb, nblocks, "select: blocks")) return NULL;
    int64_t total = 0, alive = 0;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) reduction(+ : total, alive) num_threads(threads)
    for (long long j = 0; j < nb; ++j) {
        int64_t n = select_block(&g, (const uint8_t *)bright, (const int64_t *)keys, (const uint8_t *)inside,
                                 ((const int64_t *)blocks)[j], &rule, (uint32_t *)todo + j * BLOCK,
                                 (uint32_t *)pre + j * BLOCK, &alive);
        ((int64_t *)counts)[j] = n;
        total += n;
    }
    Py_END_ALLOW_THREADS
    return Py_BuildValue("LL", (long long)total, (long long)alive);
}

PyDoc_STRVAR(gather_doc,
"gather(buf, patches, np, filters, nf, hr, wr, k, blocks, nb, todo, counts, x, states, rows, threads, cells,\n"
"       capacity)\n\n"
"Writes the MLP input rows x (M, nf*k + np), the states (M, k) and the buffer rows (M,) of the\n"
"cells ``select`` chose, block by block in the order of ``blocks``.");

static PyObject *py_gather(PyObject *self, PyObject *args) {
    unsigned long long buf, patches, filters, blocks, todo, counts, x, states, rows;
    long long np, hr, wr, k, nb;
    int nf, threads;
    Grid g;
    long long cells, capacity;
    if (!PyArg_ParseTuple(args, "KKLKiLLLKLKKKKKiLL", &buf, &patches, &np, &filters, &nf, &hr, &wr, &k, &blocks,
                          &nb, &todo, &counts, &x, &states, &rows, &threads, &cells, &capacity) ||
        !parse_grid(&g, hr, wr, k))
        return NULL;
    long long nblocks = block_count(&g, cells), total = 0;
    if (nblocks < 0 || !ids_below((const int64_t *)blocks, nb, nblocks, "gather: blocks")) return NULL;
    for (long long j = 0; j < nb; ++j) total += ((const int64_t *)counts)[j];
    if (total > capacity) {
        PyErr_Format(PyExc_ValueError, "gather: %lld rows chosen, the outputs hold %lld", total, capacity);
        return NULL;
    }
    if (nf < 1 || nf > MAX_FILTERS || nf * k > MAX_FEATURES) {
        PyErr_SetString(PyExc_ValueError, "gather takes 1-4 filters and at most 256 features");
        return NULL;
    }
    if (nb <= 0) Py_RETURN_NONE;
    int64_t *offsets = PyMem_RawMalloc(nb * sizeof(int64_t));
    if (!offsets) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    int64_t m = 0;
    for (long long j = 0; j < nb; ++j) offsets[j] = m, m += ((const int64_t *)counts)[j];
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long long j = 0; j < nb; ++j) {
        if (((const int64_t *)counts)[j] == 0) continue;
        (k == 16 ? gather_block16 : gather_block)(&g, (const float *)buf, (const float *)patches, np,
                                                  (const float *)filters, nf, ((const int64_t *)blocks)[j],
                                                  (const uint32_t *)todo + j * BLOCK, offsets[j], (float *)x,
                                                  (float *)states, (int64_t *)rows);
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(offsets);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(scatter_doc,
"scatter(buf, bright, inside, hr, wr, k, blocks, nb, states, rows, m, pre, thr, keep, flags, reach, threads,\n"
"        cells)\n\n"
"Writes the m new states into the buffer and their bright flags (visible >= thr), clears the\n"
"blocks' cells not alive both before (pre) and after the update (their flags too), and sets\n"
"and after the update, and sets reach (B*nby*nbx bytes, zeroed by the caller) to 1 for the\n"
"blocks the next step can change. keep (nb x 16 uint32) and flags (nb x 9 bytes) are scratch.");

static PyObject *py_scatter(PyObject *self, PyObject *args) {
    unsigned long long buf, bright, inside, blocks, states, rows, pre, keep, flags, reach;
    long long hr, wr, k, nb, m;
    float thr;
    int threads;
    Grid g;
    long long cells;
    if (!PyArg_ParseTuple(args, "KKKLLLKLKKLKfKKKiL", &buf, &bright, &inside, &hr, &wr, &k, &blocks, &nb, &states,
                          &rows, &m, &pre, &thr, &keep, &flags, &reach, &threads, &cells) ||
        !parse_grid(&g, hr, wr, k))
        return NULL;
    long long nblocks = block_count(&g, cells);
    if (nblocks < 0 || !ids_below((const int64_t *)blocks, nb, nblocks, "scatter: blocks") ||
        !ids_below((const int64_t *)rows, m, cells, "scatter: rows"))
        return NULL;
    float *state = (float *)buf;
    uint8_t *bright_cells = (uint8_t *)bright;
    const int64_t *ids = (const int64_t *)blocks;
    uint32_t *kept = (uint32_t *)keep;
    uint8_t *flag = (uint8_t *)flags, *out = (uint8_t *)reach;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads)
    {
        /* Three phases, each ending at a barrier: a block's alive test reads its neighbours' new
         * values, which must all be written first and none cleared yet. */
#pragma omp for schedule(static)
        for (long long i = 0; i < m; ++i) {
            int64_t row = ((const int64_t *)rows)[i];
            const float *new_state = (const float *)states + i * k;
            memcpy(state + row * k, new_state, k * sizeof(float));
            bright_cells[row] = new_state[0] >= thr;
        }
#pragma omp for schedule(static)
        for (long long j = 0; j < nb; ++j)
            keep_block(&g, bright_cells, (const uint8_t *)inside, ids[j], (const uint32_t *)pre + j * BLOCK,
                       kept + j * BLOCK, flag + j * 9);
#pragma omp for schedule(static)
        for (long long j = 0; j < nb; ++j) {
            int64_t origin = frame_origin(&g, ids[j]);
            for (int y = 0; y < BLOCK; ++y)
                for (int x = 0; x < BLOCK; ++x)
                    if (!(kept[j * BLOCK + y] >> x & 1)) {
                        int64_t row = origin + (y + RING) * g.wr + x + RING;
                        memset(state + row * k, 0, k * sizeof(float));
                        bright_cells[row] = 0;
                    }
        }
    }
    int64_t per_image = g.nby * g.nbx;
    for (long long j = 0; j < nb; ++j) {
        int64_t b = ids[j] / per_image, by = ids[j] % per_image / g.nbx, bx = ids[j] % g.nbx;
        for (int d = 0; d < 9; ++d) {
            int64_t y = by + d / 3 - 1, x = bx + d % 3 - 1;
            if (flag[j * 9 + d] && y >= 0 && y < g.nby && x >= 0 && x < g.nbx) out[(b * g.nby + y) * g.nbx + x] = 1;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(perceive_rows_doc,
"perceive_rows(state, b, h, w, k, rows, m, filters, nf, out, threads)\n\n"
"out (m, nf*k): perception of the cells at pixel rows ``rows`` of state (b*h*w, k), zero outside.");

static PyObject *py_perceive_rows(PyObject *self, PyObject *args) {
    unsigned long long state, rows, filters, out;
    long long b, h, w, k, m;
    int nf, threads;
    if (!PyArg_ParseTuple(args, "KLLLLKLKiKi", &state, &b, &h, &w, &k, &rows, &m, &filters, &nf, &out, &threads) ||
        !rows_ascend((const int64_t *)rows, m, b * h * w, "perceive_rows"))
        return NULL;
    if (nf < 1 || nf > MAX_FILTERS || nf * k > MAX_FEATURES) {
        PyErr_SetString(PyExc_ValueError, "perceive_rows takes 1-4 filters and at most 256 features");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
#else
        int64_t parts = 1, part = 0;
#endif
        int64_t from = m * part / parts, to = m * (part + 1) / parts;
        if (k == 16)
            rows_block16((const float *)state, h, w, (const int64_t *)rows, from, to, (const float *)filters, nf,
                         (float *)out, NULL, NULL, NULL);
        else
            perceive_rows_range((const float *)state, h, w, k, (const int64_t *)rows, from, to,
                                (const float *)filters, nf, (float *)out);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(perceive_rows_backward_doc,
"perceive_rows_backward(state, b, h, w, k, rows, m, filters, nf, grad, grad_state, grad_filters, threads)\n\n"
"Adds the gradient of perceive_rows: into grad_state (b*h*w, k; 0 for none) and grad_filters\n"
"(nf, 9, k). ``rows`` must ascend; images are split between threads, so no two threads add to\n"
"the same state.");

static PyObject *py_perceive_rows_backward(PyObject *self, PyObject *args) {
    unsigned long long state, rows, filters, grad, grad_state, grad_filters;
    long long b, h, w, k, m;
    int nf, threads;
    if (!PyArg_ParseTuple(args, "KLLLLKLKiKKKi", &state, &b, &h, &w, &k, &rows, &m, &filters, &nf, &grad,
                          &grad_state, &grad_filters, &threads))
        return NULL;
    const int64_t *cells = (const int64_t *)rows;
    if (!rows_ascend(cells, m, b * h * w, "perceive_rows_backward")) return NULL;
    /* One partial filter gradient per image, summed in image order afterwards: the result is the
     * same at any thread count (adding per-thread sums as threads finish was not reproducible). */
    int64_t size = nf * 9 * k;
    float *partial = b > 0 ? PyMem_RawCalloc((size_t)(b * size), sizeof(float)) : NULL;
    if (b > 0 && !partial) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (long long image = 0; image < b; ++image) {
        float *local = partial + image * size;
        /* this image's rows: [first row >= image*h*w, first row >= (image+1)*h*w) */
        int64_t lo = 0, hi = m, start = image * h * w, stop = start + h * w;
        while (lo < hi) { int64_t mid = (lo + hi) / 2; if (cells[mid] < start) lo = mid + 1; else hi = mid; }
        int64_t from = lo;
        hi = m;
        while (lo < hi) { int64_t mid = (lo + hi) / 2; if (cells[mid] < stop) lo = mid + 1; else hi = mid; }
        if (k == 16)
            rows_block16((const float *)state, h, w, cells, from, lo, (const float *)filters, nf, NULL,
                         (const float *)grad, (float *)grad_state, local);
        else
            perceive_rows_backward_range((const float *)state, h, w, k, cells, from, lo, (const float *)filters,
                                         nf, (const float *)grad, (float *)grad_state, local);
    }
    for (long long image = 0; image < b; ++image)
        for (int64_t i = 0; i < size; ++i) ((float *)grad_filters)[i] += partial[image * size + i];
    Py_END_ALLOW_THREADS
    PyMem_RawFree(partial);
    Py_RETURN_NONE;
}

static PyObject *py_constants(PyObject *self, PyObject *args) {
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:K,s:K,s:i}", "BLOCK", BLOCK, "RING", RING, "MAX_FEATURES", MAX_FEATURES,
                         "MAX_FILTERS", MAX_FILTERS, "MIX1", (unsigned long long)RNCA_MIX1, "MIX2",
                         (unsigned long long)RNCA_MIX2, "STEP_SHIFT", RNCA_STEP_SHIFT);
}

static PyObject *py_openmp(PyObject *self, PyObject *args) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"select", py_select, METH_VARARGS, select_doc},
    {"gather", py_gather, METH_VARARGS, gather_doc},
    {"scatter", py_scatter, METH_VARARGS, scatter_doc},
    {"perceive_rows", py_perceive_rows, METH_VARARGS, perceive_rows_doc},
    {"perceive_rows_backward", py_perceive_rows_backward, METH_VARARGS, perceive_rows_backward_doc},
    {"constants", py_constants, METH_NOARGS, "The shared numbers the kernels were compiled with (rnca_cli/constants.py)."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the kernels were built with OpenMP (run on several threads)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", "Fused CPU kernels of rnca's inference step.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
