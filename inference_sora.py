"""Batch inference entry point: ``torchrun --nproc_per_node N inference_sora.py --mm-model JSON ...``.

parse + validate -> select backend -> init distributed -> build -> generate -> tear down.
The logic lives in ``mm/inference/`` (``cli.py`` flags, ``pipeline.py`` sampling, ``runner.py`` outputs).
Exit code 2: bad arguments or inputs, reported before anything is built. Exit code 0 at once when every
requested sample (and the grid) already exists.
"""

import os
import sys

from mm.inference.cli import nothing_to_do, parse_request, run, setup_logging


def main(argv=None) -> int:
    try:
        request = parse_request(argv)
    except ValueError as err:
        print(f"inference_sora.py: error: {err}", file=sys.stderr)
        return 2

    if nothing_to_do(request):  # a file check on every rank: no process group, no model
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"inference_sora.py: every requested output already exists in {request.output.save_path}; "
                  "nothing to do", file=sys.stderr)
        return 0

    from mm.ops import BackendUnavailableError, select_backend

    try:
        select_backend(request.backend)
    except BackendUnavailableError as err:
        print(f"inference_sora.py: error: {err}", file=sys.stderr)
        return 2
    setup_logging()

    from mm.distributed.init import destroy_parallel, init_parallel

    parallel = init_parallel(request.parallel, timeout_s=60 * request.parallel.distributed_timeout_minutes)
    from mm.training.checkpointing import CheckpointError

    try:
        run(request, parallel)
    except CheckpointError as err:  # no checkpoint under --load verifies: every bad file is named
        if parallel.rank == 0:
            print(f"inference_sora.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
