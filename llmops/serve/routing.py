"""How Ray Serve's proxies pick a replica of `llmops serve --replicas/--ray`: a conversation's turns go to the
replica whose vLLM already holds its prefix in the KV cache; requests of no conversation go to the less busy
of two replicas.

The proxies import this module by name (`ROUTER`), on every node. It imports Ray Serve at the top: only
`run_on_ray` imports it in llmops, once Ray Serve is loaded.

A conversation is named by the `x-session-id` request header (Ray Serve's session header; `llmops chat` sends
one for each conversation). Ray's `ConsistentHashRouter` maps it to a replica on a hash ring, the same on every
proxy, and when that replica refuses (its max_ongoing_requests are taken) tries the next replicas on the ring.
Here the ring's loads are bounded too (consistent hashing with bounded loads, Mirrokni et al. 2018): a replica
already holding more than LOAD_BOUND times the average of the requests in flight passes the conversation to
the next one on the ring. Plain hashing put 8 conversations on 2 replicas unevenly enough that their turn-10
TTFT median was 2.2x that of routing without affinity. Without the header that router hashes a fresh request
id, a uniform random pick blind to load; here such a request goes to the power of two choices instead (two
replicas at random, the one with fewer requests in flight), Serve's default.
"""

from __future__ import annotations

import math
import random
from typing import List, Optional

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

ROUTER = "llmops.serve.routing.SessionAffinityRouter"
# A replica takes a conversation while it would hold at most this times the average load: nearer 1 balances
# the replicas more evenly and moves more conversations off the replica that caches them.
LOAD_BOUND = 1.25


class SessionAffinityRouter(ConsistentHashRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is not None and not pending_request.metadata.session_id and candidate_replicas:
            # One rank of two: Serve asks both how many requests they hold and sends to the lower.
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranks = await super().choose_replicas(candidate_replicas, pending_request)  # the ring's order
        if len(ranks) < 2:
            return ranks
        loads = {r.replica_id: n or 0 for r, n in await self._probe_queue_lens([r[0] for r in ranks], 0)}
        bound = math.ceil(LOAD_BOUND * (sum(loads.values()) + 1) / len(ranks))
        first = next((i for i, rank in enumerate(ranks) if loads.get(rank[0].replica_id, 0) + 1 <= bound), 0)
        return ranks[first:] + ranks[:first]

    def initialize_state(self, **kwargs) -> None:
        # Every replica in the ring's order, so the bound can pass a conversation on as far as it must.
        super().initialize_state(**{"num_fallback_replicas": 1_000_000, **kwargs})
