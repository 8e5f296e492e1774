"""Eviction policies: which resident, unpinned slot gives up its expert for a new one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable


class EvictionPolicy(ABC):
    """Sees every access to a slot; names a victim among the slots `is_evictable` allows."""

    @abstractmethod
    def record_access(self, slot: int) -> None: ...

    @abstractmethod
    def forget(self, slot: int) -> None: ...

    @abstractmethod
    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None: ...


class LRUPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def record_access(self, slot: int) -> None:
        self._order[slot] = None
        self._order.move_to_end(slot)

    def forget(self, slot: int) -> None:
        self._order.pop(slot, None)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None:
        return next((slot for slot in self._order if is_evictable(slot)), None)


def make_policy(name: str) -> EvictionPolicy:
    policies = {"lru": LRUPolicy}
    if name not in policies:
        raise ValueError(f"unknown eviction policy {name!r}; valid: {', '.join(policies)}")
    return policies[name]()
