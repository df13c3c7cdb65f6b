"""Files in and out, by concern:

* :mod:`.formats`: the suffix registry of readers and writers (PNG, TIFF, other 2D images, NIfTI);
* :mod:`.masks`: stored values read as intensities and probabilities, results written back in the
  input's geometry;
* :mod:`.atomic`: every write to a temporary file renamed into place, OS failures as one line;
* :mod:`.pairing`: folders of cases paired by case id.

The names below are the package's interface; callers use ``from rnca_cli import io``.
"""

from ..errors import InputError, OutputError
from .atomic import (
    LOCK_NAME, atomic_path, check_writable, claim_folder, make_folder, refuse_input_folders, sweep_temporaries, write_csv,
    write_text,
)
from .formats import (
    FORMATS, IMAGE_SUFFIXES, LOSSLESS_2D, NIFTI_SUFFIXES, SUPPORTED_SUFFIXES, Format, case_id, format_of, is_nifti,
    peek_shape, peek_spacing, register, suffix_of,
)
from .masks import Loaded, output_suffix, read_image, read_images, read_mask, write_mask
from .pairing import Case, Pairing, by_case_id, list_files, pair_folders

__all__ = [
    "LOCK_NAME", "claim_folder", "refuse_input_folders", "sweep_temporaries", "FORMATS", "IMAGE_SUFFIXES", "LOSSLESS_2D", "NIFTI_SUFFIXES", "SUPPORTED_SUFFIXES", "Case", "Format",
    "InputError", "Loaded", "OutputError", "Pairing", "atomic_path", "by_case_id", "case_id", "check_writable", "format_of",
    "is_nifti", "list_files", "make_folder", "output_suffix", "pair_folders", "peek_shape", "peek_spacing", "read_image",
    "read_images", "read_mask", "register", "suffix_of", "write_csv", "write_mask", "write_text",
]
