"""The paged expert pool: a fixed number of expert slots on the compute device.

Every MoE layer shares the same slots, the way every request shares vLLM's KV blocks. A layer
pins the experts it needs, waits for those still loading, loads the misses from the backing
store, runs its kernel on the slot tensors and releases the pins. Prefetches load into slots in
the background (I/O threads on the CPU, a side stream on CUDA) and stay pinned until they land.

The host `PageTable` decides where experts go; its `DevicePageTable` copy is what kernels read
(one gather remaps router ids to slots), kept equal to it load by load and eviction by eviction.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .device_page_table import DevicePageTable
from .link import EmulatedLink
from .page_table import PageTable, PoolExhaustedError
from .policy import EvictionPolicy, ExpertKey
from .spare_cores import move_to_spare_cores
from .stats import OffloadStats, SharedClock, running_mean
from .store import ExpertCodec, ExpertStore

# Reads one layer's demand misses keep in flight on the CPU (this machine's disk: 0.82 GB/s
# with one 12 MiB read at a time, 1.15 GB/s with two, no better with more).
DEMAND_READERS = 2
# Background (prefetch) loads in flight on the CPU: one I/O thread on the spare core.
IO_THREADS = 1


class _CudaLoad:
    """A load on the copy stream: waited on by the compute stream, never by the host."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)

    def raise_if_failed(self) -> None:
        """Copies on a stream do not fail later: the host read raised when it was queued."""


class _ThreadLoad:
    def __init__(self, future: Future) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        self.future.result()

    def raise_if_failed(self) -> None:
        self.future.result()


class _Landed:
    """A load of a pool that only keeps the books: nothing moves, so it has landed."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def raise_if_failed(self) -> None:
        pass


_LANDED = _Landed()


class ExpertPool:
    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        device: torch.device,
        layers: Sequence[int],
        policy: EvictionPolicy,
        stats: OffloadStats,
        io_threads: int = IO_THREADS,
        link: EmulatedLink | None = None,
        codec: ExpertCodec | None = None,
        moves_data: bool = True,
    ) -> None:
        """`layers`: the MoE layer ids, one row each in the device page table.

        `io_threads=0` loads on the calling thread even in the background (on the CPU): every
        load has landed when `prefetch` returns, which makes the offline replay deterministic.
        `moves_data=False` keeps only the books (the offline replay): the page table, the
        policy and the stats decide and count as they do online, but no load reads the store
        or writes a slot, and the device page table is not kept.
        """
        assert store.layout is not None, "the pool is built after the store is written"
        self.store = store
        self.codec = codec or ExpertCodec()
        self.link = link
        self.stats = stats
        self.policy = policy
        self.moves_data = moves_data
        self.table = PageTable(num_slots, policy)
        self.device = device
        self.device_table = DevicePageTable(layers, store.num_experts, device)
        # Every tensor of a slot, `[num_slots, ...]` each: `w13`, `w2` and, for models whose
        # experts have them, their biases. Kernels index them all by slot id.
        self.slot_tensors = {
            spec.name: torch.empty((num_slots, *spec.shape), dtype=spec.dtype, device=device)
            for spec in self.codec.slot_specs(store.layout)
        }
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.io_threads = io_threads
        self._io = (
            ThreadPoolExecutor(io_threads, "expertflow-io", initializer=move_to_spare_cores)
            if self._copy_stream is None and io_threads > 0
            else None
        )
        # Demand misses of one layer load together (the calling thread and these): a disk
        # serves a few reads in flight faster than one after another.
        self._demand_io = (
            ThreadPoolExecutor(
                DEMAND_READERS - 1, "expertflow-demand", initializer=move_to_spare_cores
            )
            if self._io is not None
            else None
        )
        # slot -> its load still in flight
        self._loading: dict[int, _CudaLoad | _ThreadLoad | _Landed] = {}
        self._unused_prefetches: set[int] = set()
        self._num_permanent = 0
        self.mean_load_seconds: float | None = None  # per expert, a running mean
        self._store_clock = SharedClock()  # each load's share of the store's time
        self.holds_every_expert = False  # set by `fill`
        # Set by `fill` when each layer's experts sit in consecutive slots in expert order:
        # per layer, its slot tensors' views, which kernels index by router ids as they are.
        self.layer_views: dict[int, dict[str, torch.Tensor]] | None = None

    @property
    def w13(self) -> torch.Tensor:
        """Fused gate/up weights, `[num_slots, ...]` in the kernel's layout."""
        return self.slot_tensors["w13"]

    @property
    def w2(self) -> torch.Tensor:
        """Down weights, `[num_slots, ...]` in the kernel's layout."""
        return self.slot_tensors["w2"]

    @property
    def num_slots(self) -> int:
        return self.table.num_slots

    @property
    def round_capacity(self) -> int:
        """Distinct experts one kernel call may use: slots not pinned for good."""
        return self.num_slots - self._num_permanent

    def ensure_resident(
        self, layer: int, experts: list[int], booked: Collection[int] = ()
    ) -> list[int]:
        """Pins `experts` of `layer` in slots, loading the misses; returns their slots in order.

        Hits are pinned before any miss is placed so a load never evicts an expert this layer
        needs. The caller must `release` the slots once its kernel has run. `booked`: experts an
        earlier round of the same layer-step already counted; found resident again, they are
        not a new lookup (else a pool too small for one round would look like it hits more).
        """
        assert len(experts) <= self.round_capacity, "more experts than free slots: run rounds"
        self._reap_finished_loads()
        slots: list[int | None] = [self.table.lookup((layer, e)) for e in experts]
        for slot in slots:
            if slot is not None:
                self.table.pin(slot)
                self.table.touch(slot)
        misses = [i for i, slot in enumerate(slots) if slot is None]
        hits = sum(
            1
            for e, slot in zip(experts, slots, strict=True)
            if slot is not None and e not in booked
        )
        self.stats.record_lookups(layer, hits, len(misses))
        start = time.perf_counter()
        for slot in slots:
            if slot is not None:
                self._wait_if_loading(layer, slot)
        for i in misses:
            slots[i] = self._allocate_for_step((layer, experts[i]))
        self._load_now([(layer, experts[i], slots[i]) for i in misses])
        self.stats.record_stall(layer, time.perf_counter() - start)
        return slots  # type: ignore[return-value]

    def prefetch(self, layer: int, expert: int) -> bool:
        """Starts loading an expert in the background; False if resident or no slot is free."""
        if self.table.lookup((layer, expert)) is not None:
            return False
        try:
            slot = self._allocate((layer, expert), prefetch=True)
        except PoolExhaustedError:
            return False
        self._loading[slot] = self._load(layer, expert, slot, background=True)
        self._unused_prefetches.add(slot)
        self.stats.record_prefetch(layer)
        return True

    def admit(self, layer: int, experts: list[int]) -> None:
        """Books a layer that already ran and starts loading the experts it missed; never waits.

        For kernels that served the misses straight from the store (the graph step): hits are
        touched, misses load in the background into slots nothing has pinned, as many as fit.
        """
        self._reap_finished_loads()
        misses = []
        for expert in experts:
            slot = self.table.lookup((layer, expert))
            if slot is None:
                misses.append(expert)
                continue
            self.table.touch(slot)
        self.stats.record_lookups(layer, len(experts) - len(misses), len(misses))
        for expert in misses:
            try:
                slot = self._allocate((layer, expert))
            except PoolExhaustedError:
                return
            self._loading[slot] = self._load(layer, expert, slot, background=True)

    def pin_permanently(self, keys: list[ExpertKey]) -> None:
        """Loads `keys` and keeps them resident for the pool's lifetime (a static hot set)."""
        loads = [(layer, expert, self._allocate((layer, expert))) for layer, expert in keys]
        self._load_now(loads)
        for _, _, slot in loads:
            self.table.never_evict(slot)  # the allocation's pin is never released
        self._num_permanent += len(keys)

    def fill(self, keys: list[ExpertKey]) -> None:
        """Loads `keys` now, evictable like any (a pool that holds every expert never misses)."""
        loads = [(layer, expert, self._allocate((layer, expert))) for layer, expert in keys]
        self._load_now(loads)
        self.release([slot for _, _, slot in loads])
        every_expert = len(self.device_table.layers) * self.store.num_experts
        # From now on nothing is ever allocated, so nothing is evicted: steps may skip the table.
        self.holds_every_expert = self.table.num_resident == every_expert
        if self.holds_every_expert:
            self.layer_views = self._layer_views()

    def _layer_views(self) -> dict[int, dict[str, torch.Tensor]] | None:
        """Each layer's slot tensors as views, if its experts fill consecutive slots in expert
        order (a fresh pool filled layer by layer); else None."""
        num_experts, views = self.store.num_experts, {}
        for layer in self.device_table.layers:
            first = self.table.lookup((layer, 0))
            if any(self.table.lookup((layer, e)) != first + e for e in range(num_experts)):
                return None
            views[layer] = {
                name: t[first : first + num_experts] for name, t in self.slot_tensors.items()
            }
        return views

    @property
    def loads_in_flight(self) -> int:
        """Background loads not yet landed: what the link still has queued."""
        self._reap_finished_loads()
        return len(self._loading)

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.table.unpin(slot)

    def drain(self) -> None:
        """Waits for every background load (the host waits: for tests and shutdown only)."""
        for load in self._loading.values():
            load.wait()
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        self._reap_finished_loads()

    def close(self) -> None:
        """Finishes background loads and stops the I/O threads."""
        self.drain()
        for executor in (self._io, self._demand_io):
            if executor is not None:
                executor.shutdown()

    def _allocate_for_step(self, key: ExpertKey) -> int:
        """Like `_allocate`, but a demand load may wait for background loads to free slots."""
        try:
            return self._allocate(key)
        except PoolExhaustedError:
            if not self._loading:
                raise
            self.drain()
            return self._allocate(key)

    def _allocate(self, key: ExpertKey, prefetch: bool = False) -> int:
        """A pinned slot for `key`; counts an evicted, never-used prefetch as waste."""
        slot, evicted = self.table.allocate(key, prefetch)
        self.table.pin(slot)
        if evicted is not None and self.moves_data:
            # On the compute stream, before the copy stream (which waits for it) overwrites
            # the slot: a kernel queued after this reads the expert from the store instead.
            self.device_table.clear(*evicted)
        if evicted is not None and slot in self._unused_prefetches:
            self._unused_prefetches.discard(slot)
            self.stats.record_wasted_prefetch(evicted[0])
        return slot

    def _wait_if_loading(self, layer: int, slot: int) -> None:
        if slot in self._unused_prefetches:
            self._unused_prefetches.discard(slot)
            self.stats.record_used_prefetch(layer)
        load = self._loading.pop(slot, None)
        if load is not None:
            load.wait()
            self.table.unpin(slot)  # the load's own pin; the step's pin stays

    def _reap_finished_loads(self) -> None:
        for slot in [s for s, load in self._loading.items() if load.done()]:
            load = self._loading.pop(slot)
            self.table.unpin(slot)
            # A failed load (e.g. a record that fails its checksum) leaves the slot unfilled
            # while the page table names it: raise rather than ever compute on it.
            load.raise_if_failed()

    def _load_now(self, loads: list[tuple[int, int, int]]) -> None:
        """(layer, expert, slot) loads the caller waits for, as many at once as the store
        serves in parallel: the calling thread and the demand readers, never behind prefetches."""
        if not self.moves_data:
            return
        if self._copy_stream is not None or self._demand_io is None:
            for layer, expert, slot in loads:
                self._load(layer, expert, slot, background=False).wait()
            return
        # Dealt out in turn, so each reader has as many loads as the others (one each at a
        # time kept the calling thread idle after its first while the helper did the rest).
        shares = [loads[reader::DEMAND_READERS] for reader in range(DEMAND_READERS)]
        helped = [self._demand_io.submit(self._copy_all, share) for share in shares[1:] if share]
        self._copy_all(shares[0])
        for future in helped:
            future.result()

    def _copy_all(self, loads: list[tuple[int, int, int]]) -> None:
        for layer, expert, slot in loads:
            self._copy_in(layer, expert, slot)

    def _load(
        self, layer: int, expert: int, slot: int, background: bool
    ) -> _CudaLoad | _ThreadLoad | _Landed:
        if not self.moves_data:
            return _LANDED
        if self._copy_stream is None:
            if background and self._io is not None:
                return _ThreadLoad(self._io.submit(self._copy_in, layer, expert, slot))
            # A demand load must not queue behind prefetches: it runs on the calling thread.
            done: Future = Future()
            self._copy_in(layer, expert, slot)
            done.set_result(None)
            return _ThreadLoad(done)
        # A slot released by this layer may still be read by a queued kernel: load after it.
        self._copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._copy_stream):
            self._copy_in(layer, expert, slot)
            return _CudaLoad(self._copy_stream)

    @property
    def max_loads_in_flight(self) -> int:
        """Loads the pool may have in flight at once: its I/O threads and demand readers."""
        return self.io_threads + DEMAND_READERS if self._io is not None else 1

    def measure_load_seconds(self, count: int) -> list[float]:
        """Wall seconds per expert load with 1, 2, ... `max_loads_in_flight` loads at once,
        `count` loads each: the store's own reads and expansion, into scratch memory so no
        slot changes. Each level reads experts the others did not (a store re-read at once
        may come from a cache the run's loads would not find warm)."""
        layers = self.device_table.layers
        total = len(layers) * self.store.num_experts

        def read_share(share: list[int]) -> None:
            scratch = {name: torch.empty_like(t[:1]) for name, t in self.slot_tensors.items()}
            for i in share:
                self._read_into(layers[i % len(layers)], i // len(layers), scratch)

        seconds = []
        for in_flight in range(1, self.max_loads_in_flight + 1):
            first = (in_flight - 1) * count
            keys = [i % total for i in range(first, first + count)]
            start = time.perf_counter()
            with ThreadPoolExecutor(in_flight, initializer=move_to_spare_cores) as executor:
                shares = [keys[reader::in_flight] for reader in range(in_flight)]
                for done in [executor.submit(read_share, share) for share in shares]:
                    done.result()
            if self._copy_stream is not None:
                torch.cuda.synchronize(self.device)
            seconds.append((time.perf_counter() - start) / max(count, 1))
        return seconds

    def _copy_in(self, layer: int, expert: int, slot: int) -> None:
        start, mark = time.perf_counter(), self._store_clock.start()
        self._read_into(
            layer, expert, {name: t[slot : slot + 1] for name, t in self.slot_tensors.items()}
        )
        # Queued behind the copy (same stream or thread): kernels see the slot once it holds
        # the expert, and read the store until then.
        self.device_table.set(layer, expert, slot)
        seconds = time.perf_counter() - start
        link_seconds = self._store_clock.stop(mark)
        self.stats.record_load(layer, self.store.layout.nbytes, seconds, link_seconds)
        self.mean_load_seconds = running_mean(self.mean_load_seconds, seconds)

    def _read_into(self, layer: int, expert: int, slot: dict[str, torch.Tensor]) -> None:
        """One load: the store's read, decoded into one slot's tensors (`[1, ...]` each), through
        the emulated link."""
        record = self.store.read_expert(layer, expert)
        self.codec.decode({name: t[None] for name, t in record.items()}, slot)
        if self.link is not None:
            self.link.transfer(self.store.layout.nbytes)
