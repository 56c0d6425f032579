"""A Flower ``Grid`` that delivers messages to a ClientApp in this process: fast fault tests without Ray.

One node per partition, each with its own ``Context`` (so ``context.state`` persists
per node as in Flower's engines). ``fault(msg, context)`` may return a replacement
reply to a TRAIN message (a hostile or broken client), ``LOST`` (no reply
arrives: a timeout), raise (the client crashes), or return None
(behave normally). Messages round-trip through Flower's own serialisation
(``deflate``/``inflate``), like on the wire, so the server never shares tensors
with a client. Server and clients do share the process-wide runtime (one model
object, as a Ray worker serving many clients does); the server loop sets the model's
state from the aggregate before using it, and the kill-and-resume test checks that a
LocalGrid run ends bit-identical to a run on Flower's simulation engine.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

Fault = Callable[[Message, Context], "Message | object | None"]
LOST = object()  # a fault returning this: the reply never arrives (a timeout, a partition)


def _wire(message: Message) -> Message:
    """``message`` serialised and rebuilt (Flower's object format)."""
    objects = get_all_nested_objects(message)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    rebuilt = inflate_object_from_contents(message.object_id, contents, keep_object_contents=False)
    rebuilt.metadata.__dict__.update({k: v for k, v in message.metadata.__dict__.items()})
    return rebuilt


class LocalGrid(Grid):
    def __init__(self, app: ClientApp, num_nodes: int, *, fault: Fault | None = None, wire: bool = True) -> None:
        self.app = app
        self.fault = fault
        self.wire = wire
        self.dead: set[int] = set()
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self._run = None
        self.sent: list[Message] = []
        self.replies: list[Message] = []  # every reply as the server received it
        self.timeouts: list[float | None] = []  # the timeout of each send_and_receive call
        # what Flower's ServerApp runtime sets before main(): messages take their ids from it
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.dead]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers synchronously: use send_and_receive")

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        context = self.contexts[node]
        if node in self.dead:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, "node is gone"), reply_to=msg)
        try:
            reply = self.fault(msg, context) if self.fault and msg.metadata.message_type == MessageType.TRAIN else None
            if reply is LOST:
                return reply
            if reply is None:
                reply = self.app(_wire(msg) if self.wire else msg, context)
        except Exception as err:  # what Flower's engines do with an exception in a ClientApp
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"), reply_to=msg)
        return _wire(reply) if self.wire and reply.has_content() else reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self.timeouts.append(timeout)
        replies = []
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        for msg, n in zip(messages, itertools.count()):
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex + str(n)
            msg.metadata.__dict__["_src_node_id"] = 0
            self.sent.append(msg)
            reply = self._deliver(msg)
            if (
                reply is not LOST and time.monotonic() <= deadline
            ):  # a reply after the timeout is lost, as on a real link
                replies.append(reply)
                self.replies.append(reply)
        return replies
