"""torchrun for one sweep job, without torchrun's own traceback when a rank fails.

When a rank fails, torchrun raises ChildFailedError, and its traceback would fill the screen after the
rank's own one-line error (and a crashing rank's traceback). This exits with the failed rank's status
instead; HYDRA_FULL_ERROR=1 keeps torchrun's traceback, as for every other error.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(sys.argv[1:])
    except ChildFailedError as failure:
        if os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0"):
            raise
        _, first = failure.get_first_failure()
        sys.exit(first.exitcode if first.exitcode > 0 else 1)


if __name__ == "__main__":
    main()
