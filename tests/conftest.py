"""Select the cpu backend (and apply the megatron cpu patches) once, before any test imports megatron,
so the fork-based multi-rank harness children inherit a ready process."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from mm.ops import select_backend  # noqa: E402

# the on-disk data indexes the tests build land in one temporary directory, not in ~/.cache
if "MM_DATA_INDEX_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["MM_DATA_INDEX_CACHE"] = tempfile.mkdtemp(prefix="mm_data_index_")
    atexit.register(shutil.rmtree, os.environ["MM_DATA_INDEX_CACHE"], True)

select_backend("cpu")
