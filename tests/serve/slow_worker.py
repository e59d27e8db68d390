"""A test double of `veil worker`: ``python -m tests.serve.slow_worker SECONDS ARGS...`` runs
`veil.serve.worker` with ARGS, sleeping SECONDS before evaluating each job, so a test can kill a
worker while it holds a claimed job."""

from __future__ import annotations

import sys
import time

from veil.serve import worker


def main() -> int:
    pause = float(sys.argv[1])
    evaluate = worker.Worker._evaluate

    def slow(self: worker.Worker, fields: dict, extra: dict) -> bytes:
        time.sleep(pause)
        return evaluate(self, fields, extra)

    worker.Worker._evaluate = slow  # type: ignore[method-assign]
    return worker.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
