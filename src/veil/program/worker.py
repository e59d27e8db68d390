"""A worker interpreter of `veil.program.parallel`: ``python -m veil.program.worker``.

Steps: (1) keep the real stdin and stdout for frames and point file descriptors 0 and 1 at
/dev/null and stderr, so no library print reaches the frame stream; (2) read the setup frame
(server dict, client spec, loaders, secret keys), rebuild the pipeline and answer ("ready",) or
("error", exception); (3) answer each ("task", id, layout, data, dtype, n_features) with
("ok", id, outputs) or ("error", id, exception), in order, until the parent closes stdin.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    frames_in = os.fdopen(os.dup(0), "rb")
    frames_out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)

    from veil.program.parallel import _build, portable_exception, recv_frame, run_chunk, send_frame

    try:
        pipeline = _build(*recv_frame(frames_in))
    except EOFError:
        return
    except Exception as exc:
        send_frame(frames_out, ("error", portable_exception(exc)))
        return
    send_frame(frames_out, ("ready",))
    while True:
        try:
            task = recv_frame(frames_in)
        except EOFError:
            return
        _, task_id, *args = task
        try:
            reply = ("ok", task_id, run_chunk(pipeline, *args))
        except Exception as exc:
            reply = ("error", task_id, portable_exception(exc))
        send_frame(frames_out, reply)


if __name__ == "__main__":
    sys.exit(main())
