"""How Ray Serve's proxies pick a replica of `llmops serve --replicas/--ray`: a conversation's turns go to the
replica whose vLLM already holds its prefix in the KV cache; requests of no conversation go to the less busy
of two replicas.

The proxies import this module by name (`ROUTER`), on every node: it imports Ray at the top, and nothing else
in llmops imports it.

A conversation is named by the `x-session-id` request header (Ray Serve's session header; `llmops chat` sends
one for each conversation). Ray's `ConsistentHashRouter` maps it to a replica on a hash ring, the same on every
proxy, and when that replica refuses (its max_ongoing_requests are taken) tries the next replicas on the ring.
Without the header that router hashes a fresh request id, a uniform random pick blind to load; here such a
request goes to the power of two choices instead (two replicas at random, the one with fewer requests in
flight), Serve's default.
"""

from __future__ import annotations

import random
from typing import List, Optional

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

ROUTER = "llmops.serve.routing.SessionAffinityRouter"


class SessionAffinityRouter(ConsistentHashRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is not None and not pending_request.metadata.session_id and candidate_replicas:
            # One rank of two: Serve asks both how many requests they hold and sends to the lower.
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        return await super().choose_replicas(candidate_replicas, pending_request)
