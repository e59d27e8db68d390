"""A worker interpreter of `veil.program.parallel`: ``python -m veil.program.worker TASK_FD REPLY_FD``.

Steps: (1) open the two frame pipes the parent passed (tasks in, replies out); stdin, stdout and
stderr are left to the interpreter and the libraries, so nothing they print reaches a frame;
(2) read the setup frame (server dict, client spec, loaders, secret keys), rebuild the pipeline and
answer ("ready",) or ("error", exception); (3) answer each ("task", id, layout, data, dtype,
n_features) with ("ok", id, outputs) or ("error", id, exception), in order, until the parent
closes the task pipe.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not all(a.isdigit() for a in args):
        print("usage: python -m veil.program.worker TASK_FD REPLY_FD (started by veil.program.parallel)",
              file=sys.stderr)
        return 2
    frames_in = os.fdopen(int(args[0]), "rb")
    frames_out = os.fdopen(int(args[1]), "wb")

    from veil.program.parallel import build_pipeline, portable_exception, recv_frame, run_chunk, send_frame

    try:
        pipeline = build_pipeline(*recv_frame(frames_in))
    except EOFError:
        return 0
    except Exception as exc:
        send_frame(frames_out, ("error", portable_exception(exc)))
        return 0
    send_frame(frames_out, ("ready",))
    while True:
        try:
            task = recv_frame(frames_in)
        except EOFError:
            return 0
        _, task_id, *args = task
        try:
            reply = ("ok", task_id, run_chunk(pipeline, *args))
        except Exception as exc:
            reply = ("error", task_id, portable_exception(exc))
        send_frame(frames_out, reply)


if __name__ == "__main__":
    sys.exit(main())
