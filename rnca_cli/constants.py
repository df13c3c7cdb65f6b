"""Numbers shared by the rule, the engines and the C kernels, defined once.

Plain Python with no imports: ``setup.py`` reads this file to compile the C kernels with the same
values (as ``-DRNCA_...`` macros), and the kernels report the values they were built with, which
:mod:`rnca_cli.kernels` compares with these before using them.
"""

# -- the update-mask hash (rnca_cli.model.FireNoise): splitmix64 -------------------------------------
GOLDEN = 0x9E3779B97F4A7C15  # added to a seed before it is mixed into a sample's key
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
STEP_SHIFT = 40  # step t enters the hash as t << STEP_SHIFT; the draw is the top 64 - STEP_SHIFT bits
COORD_BITS = 20  # a cell's key holds y << COORD_BITS | x: coordinates and steps below 2^20

# -- the block layout of the sparse and fused engines --------------------------------------------------
BLOCK = 16  # side of the square blocks a step skips when nothing in them can change
RING = 2  # zero cells around the image in the state buffer: how far one step reads (perception + alive test)
SPARSE_BELOW = 0.5  # a step works block by block when fewer than this share of blocks can change

# -- what the fused kernels take --------------------------------------------------------------------
MAX_FILTERS = 4  # perception filters per channel (identity, Sobel-x, Sobel-y, Laplacian)
MAX_FEATURES = 256  # filters x channels

# Macros passed to the C compiler (setup.py); the kernels refuse to build without them.
C_MACROS = {
    "RNCA_BLOCK": BLOCK, "RNCA_RING": RING, "RNCA_MAX_FEATURES": MAX_FEATURES, "RNCA_MAX_FILTERS": MAX_FILTERS,
    "RNCA_MIX1": f"{MIX1:#x}ULL", "RNCA_MIX2": f"{MIX2:#x}ULL", "RNCA_STEP_SHIFT": STEP_SHIFT,
}
