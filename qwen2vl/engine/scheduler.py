"""Admission control: a FIFO of waiting requests and the list of running sequences.

A request is admitted between decode steps when the KV pool has `n` free rows for it and the step's prefill
token budget (`max_num_batched_tokens`, at least one request per step) is not spent. The queue is first come,
first served: a request that does not fit yet waits at the head (no starvation of large `n`).
"""
from __future__ import annotations

from collections import deque

from .kv_pool import KVPool
from .sequence import QueueFull, Request, Sequence, Status


class Scheduler:
    def __init__(self, pool: KVPool, *, max_num_batched_tokens: int, max_queue: int | None = None):
        self.pool = pool
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"Request id {request.request_id!r} is already in use.")
        if self.max_queue is not None and len(self.waiting) >= self.max_queue:
            raise QueueFull(f"The server is busy: {len(self.waiting)} requests are already waiting "
                            f"(max_queue={self.max_queue}). Retry later.")
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, chunked: bool = False, budget: int | None = None) -> list[Request]:
        """Requests to prefill this step. Chunked (`budget` = prompt tokens left this step): admit while tokens
        are left; the last one may not fit whole and is then prefilled over several steps by the engine."""
        admitted: list[Request] = []
        budget = self.max_num_batched_tokens if budget is None else min(budget, self.max_num_batched_tokens)
        free = self.pool.num_free
        while self.waiting:
            req = self.waiting[0]
            cost = len(req.prompt_token_ids)
            if req.params.n > free or (admitted and (budget <= 0 if chunked else cost > budget)):
                break
            free -= req.params.n
            self.waiting.popleft()
            req.status = Status.RUNNING
            admitted.append(req)
            budget -= cost
        return admitted

    def requeue(self, requests: list[Request]) -> None:
        """Put admitted requests back at the head of the queue, in order."""
        for req in reversed(requests):
            req.status = Status.WAITING
            self.waiting.appendleft(req)

    def release(self, seqs: list[Sequence]) -> None:
        """Drop `seqs` from the running set and free + compact their KV rows."""
        if not seqs:
            return
        gone = set(map(id, seqs))
        self.running = [s for s in self.running if id(s) not in gone]
        self.pool.release([s for s in seqs if s.row is not None], keep=self.running)
        self.running.sort(key=lambda s: s.row)

    def remove(self, request: Request) -> None:
        """Take a request out of the engine (finished, failed or aborted)."""
        request.status = Status.FINISHED
        self.requests.pop(request.request_id, None)
        if request in self.waiting:
            self.waiting.remove(request)
        self.release([s for s in request.seqs if s.row is not None])
