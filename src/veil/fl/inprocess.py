"""An in-process Flower engine: a `Grid` that hands each message to the owners' `ClientApp` in threads.

Flower's simulation engine starts Ray (~15 s on two cores) for every run; this engine runs the very same
`ServerApp` and `ClientApp` objects, with their mods (SecAgg+, DP clipping), in one process in well under
a second per round, which makes sweeps (datasets x settings) and tests affordable. Each node keeps its
own `Context` across messages (SecAgg+ keeps its protocol state there). A reply that does not come
back within the timeout given to `send_and_receive` is left out, exactly as on the deployment engine;
an exception raised by a `ClientApp` becomes an error reply (`CLIENT_APP_RAISED_EXCEPTION`).
The grid counts what would cross the network: each message's size as Flower's protobuf
serialization (what the gRPC transport sends), in each direction (`traffic`).

One Flower internal is touched: `flwr.supercore.task_identity.TaskIdentity`, which `Message` reads to
fill in the sender of instructions (Flower's own runtimes set it in the same way).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import logging
import threading
import traceback
import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_to_proto
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from veil.errors import FederationError

FIRST_NODE_ID = 1001
log = logging.getLogger("veil.fl")


class InProcessGrid(Grid):
    """`n_nodes` SuperNodes in this process; node `i` has node config `partition-id=i`.

    Parameters
    ----------
    client_app : flwr.client.ClientApp
        The owners' app, called as `client_app(message, context)` in a worker thread.
    n_nodes : int
        Number of data owners (SuperNodes).
    run_config : dict
        Run config every node's context carries (what `flwr run` would send).
    run_id : int
        Identifier of the run in messages' metadata.
    """

    def __init__(self, client_app: Any, n_nodes: int, run_config: dict | None = None, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config or {})
        self.node_ids = [FIRST_NODE_ID + i for i in range(n_nodes)]
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config={"partition-id": i,
                                                                                 "num-partitions": n_nodes},
                                      state=RecordDict(), run_config=dict(run_config or {}))
                         for i, nid in enumerate(self.node_ids)}
        # workers left busy by a client past its deadline must not starve later rounds
        self.pool = cf.ThreadPoolExecutor(max_workers=4 * n_nodes, thread_name_prefix="veil-node")
        self.pending: dict[str, cf.Future] = {}
        self.traffic = {"bytes_to_nodes": 0, "bytes_from_nodes": 0, "messages": 0}
        self._traffic_lock = threading.Lock()
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        """Replace the run (Flower's runtimes call this before the ServerApp starts)."""
        self._run = run

    @property
    def run(self) -> Run:
        """The current run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """An instruction message (deprecated in Flower in favour of `Message(...)`, kept for the ABC)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The owners' node ids."""
        return list(self.node_ids)

    def _deliver(self, msg: Message) -> Message:
        # a copy each way, as a transport would: mods edit records in place, and Flower's workflows
        # share record objects between the messages of one stage
        msg = copy.deepcopy(msg)
        sent = message_to_proto(msg).ByteSize()  # measured before the node's mods edit it
        try:
            reply = copy.deepcopy(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
        except Exception as exc:  # a failing owner becomes an error reply, as on Flower's runtimes
            reason = f"{type(exc).__name__}: {exc}"
            log.debug("node %s raised:\n%s", msg.metadata.dst_node_id, traceback.format_exc())
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        received = message_to_proto(reply).ByteSize()
        with self._traffic_lock:
            self.traffic["bytes_to_nodes"] += sent
            self.traffic["bytes_from_nodes"] += received
            self.traffic["messages"] += 2
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Start delivering each message to its node; returns the message ids."""
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise FederationError(f"no node {msg.metadata.dst_node_id} in this federation")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pending[msg.metadata.message_id] = self.pool.submit(self._deliver, msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that have arrived for these message ids (each is returned once)."""
        out = []
        for mid in message_ids:
            future = self.pending.get(mid)
            if future is not None and future.done():
                out.append(self.pending.pop(mid).result())
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver the messages and wait for the replies, for at most `timeout` seconds when given.

        Without a timeout the owners run one after the other in this thread (deterministic, and
        scikit-learn's warning filters are not thread-safe); with one, each runs in a worker thread."""
        if timeout is None:
            replies = []
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                if msg.metadata.dst_node_id not in self.contexts:
                    raise FederationError(f"no node {msg.metadata.dst_node_id} in this federation")
                replies.append(self._deliver(msg))
            return replies
        ids = list(self.push_messages(messages))
        cf.wait([self.pending[i] for i in ids], timeout=timeout)
        replies = list(self.pull_messages(ids))
        for mid in ids:  # late replies are dropped, as the SuperLink drops them after the round
            self.pending.pop(mid, None)
        return replies

    def close(self) -> None:
        """Stop accepting work; threads of late clients finish in the background."""
        self.pool.shutdown(wait=False, cancel_futures=True)


def run_server_app(server_app: Any, client_app: Any, n_nodes: int, run_config: dict | None = None) -> dict[str, int]:
    """Run `server_app` to completion against `n_nodes` in-process owners running `client_app`;
    returns the grid's traffic counters (serialized bytes each way, messages)."""
    grid = InProcessGrid(client_app, n_nodes, run_config)
    context = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=dict(run_config or {}))
    try:
        server_app(grid, context)
    finally:
        grid.close()
    return dict(grid.traffic)
