"""Eviction policies: the predictive one evicts the expert expected to be needed again furthest
ahead; the per-layer LRU and LFU choices equal a full scan's."""

from collections import Counter

import pytest

from vllm_expertflow.core.page_table import PageTable
from vllm_expertflow.core.policy import PredictivePolicy

LAYERS = [0, 1, 2, 3]


def run_turns(table: PageTable, turns: list[tuple[int, list[int]]]) -> None:
    """Each (layer, experts): one layer-step using those experts (loaded if missing)."""
    for layer, experts in turns:
        for expert in experts:
            slot = table.lookup((layer, expert))
            if slot is None:
                table.allocate((layer, expert))
            else:
                table.touch(slot)


def test_of_equally_used_experts_the_one_whose_layer_runs_last_goes():
    policy = PredictivePolicy()
    table = PageTable(4, policy)
    run_turns(table, [(layer, [0]) for layer in LAYERS])
    # Layer 3 just ran: layer 0 runs next, layer 3 runs last.
    _, evicted = table.allocate((3, 1))
    assert evicted == (3, 0)


def test_a_frequently_routed_expert_outstays_a_rarely_routed_one():
    policy = PredictivePolicy()
    table = PageTable(3, policy)
    # Expert 0 of layer 0 is routed at every turn, expert 1 once, long ago.
    run_turns(table, [(0, [0, 1])] + [(layer, [0]) for layer in (1, 0)] * 10)
    _, evicted = table.allocate((0, 2))
    assert evicted == (0, 1)


def test_a_predicted_expert_stays_and_predictions_expire_when_its_layer_runs():
    def table_after_the_same_turns(predicted: bool) -> tuple[PageTable, PredictivePolicy]:
        policy = PredictivePolicy()
        table = PageTable(4, policy)
        run_turns(table, [(0, [0, 7]), (1, [0, 5])])
        if predicted:
            policy.predict((1, 0), 0.9)
        return table, policy

    # Layer 1's experts are needed last, equally often: the least recent of them goes...
    table, _ = table_after_the_same_turns(predicted=False)
    assert table.allocate((1, 6))[1] == (1, 0)
    # ...unless the predictor says it is needed at layer 1's next turn.
    table, policy = table_after_the_same_turns(predicted=True)
    assert table.allocate((1, 6))[1] == (1, 5)
    before = policy.expected_wait((1, 0))
    policy.clear_predictions(1)
    assert policy.expected_wait((1, 0)) > before


def test_a_prefetch_is_recent_but_not_a_use():
    policy = PredictivePolicy()
    table = PageTable(8, policy)
    run_turns(table, [(0, [0]), (1, [0])])
    table.allocate((0, 1), prefetch=True)
    # Not routed to: expected later than the routed expert of its layer.
    assert policy.expected_wait((0, 1)) > policy.expected_wait((0, 0))
    # Not a turn of layer 0: layer 1 is still the one that ran last, so it runs again last.
    assert policy.expected_wait((1, 0)) > policy.expected_wait((0, 0))


def use_checking_evictions(table, key, rng, pinned: set[int], check, prefetch=False) -> int:
    """One lookup: a hit is touched; a miss in a full pool first runs `check(evictable, key)`
    (False: nothing could be evicted), then loads. Pins come and go at random, never all.
    Returns 1 when an eviction was checked."""
    slot = table.lookup(key)
    if slot is not None:
        table.touch(slot)
        return 0
    checked = int(table.num_resident == table.num_slots)
    if checked and not check(lambda s: s not in pinned, key):
        return checked
    slot, _ = table.allocate(key, prefetch=prefetch)
    if rng.random() < 0.2 and len(pinned) < table.num_slots // 2:
        table.pin(slot)
        pinned.add(slot)
    elif pinned and rng.random() < 0.3:
        table.unpin(pinned.pop())
    return checked


def share_candidates(policy, evictable, key) -> list[int]:
    """The layer share's rule as one scan of every slot, oldest first: the reference the
    per-layer choices must agree with. Slots pinned for good count towards their layer."""
    order = policy._order  # slot -> key, least recently used first, pinned for good excluded
    keys = [*order.values(), *policy._pinned_for_good.values()]
    per_layer = Counter(layer for layer, _ in keys)
    share = policy.layer_share
    slots = [s for s in order if evictable(s)]
    own = [s for s in slots if order[s][0] == key[0]]
    others = [s for s in slots if order[s][0] != key[0]]
    over = [s for s in others if per_layer[order[s][0]] > share]
    last_ran = [s for s in others if order[s][0] == order[others[-1]][0]] if others else []
    if per_layer[key[0]] >= share:
        return own or over or last_ran or slots
    return over or last_ran or slots


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_slots", [7, 24, 60])
@pytest.mark.parametrize("name", ["lru", "lfu"])
def test_choices_follow_the_layer_share_without_listing_every_slot(name, seed, num_slots):
    """The per-layer LRU and LFU choices equal the full scan's (the first candidate; the least
    used, oldest of equals), over random routing, wide steps, pins and slots pinned for good."""
    import random

    from vllm_expertflow.core.policy import LFUPolicy, LRUPolicy

    rng = random.Random(seed)
    layers, experts = 6, 16
    policy = {"lru": LRUPolicy, "lfu": LFUPolicy}[name](max(1, num_slots // layers))
    table = PageTable(num_slots, policy)
    for key in rng.sample([(layer, e) for layer in range(layers) for e in range(experts)], 2):
        slot, _ = table.allocate(key)
        table.pin(slot)
        table.never_evict(slot)
    uses: Counter = Counter()
    pinned: set[int] = set()

    def check(evictable, key) -> bool:
        candidates = share_candidates(policy, evictable, key)
        if name == "lru":
            expected = next(iter(candidates), None)
        else:
            expected = min(candidates, key=lambda s: uses[policy._order[s]], default=None)
        assert policy.choose_victim(evictable, key) == expected
        return expected is not None

    choices = 0
    for _ in range(400):
        layer = rng.randrange(layers)
        for expert in rng.sample(range(experts), rng.choice([1, 2, 4, 7])):
            uses[(layer, expert)] += 1
            choices += use_checking_evictions(table, (layer, expert), rng, pinned, check)
    assert choices > 100


@pytest.mark.parametrize("seed", range(4))
def test_predictive_choice_scores_every_slot_as_expected_wait_does(seed):
    """The compiled scoring picks the evictable slot a loop over `expected_wait` would (the least
    recently used of equals), through turns, prefetches, predictions, expiries and pins."""
    import random

    rng = random.Random(seed)
    layers, experts, num_slots = [1, 3, 5, 7], 16, 20  # real layer ids, not positions
    policy = PredictivePolicy()
    table = PageTable(num_slots, policy)
    pinned: set[int] = set()

    def check(evictable, key) -> bool:
        waits = [(policy.expected_wait(k), s) for s, k in policy._key_of.items() if evictable(s)]
        best = max(w for w, _ in waits)
        assert policy.choose_victim(evictable, key) == next(s for w, s in waits if w == best)
        return True

    choices = 0
    for _ in range(150):
        for layer in layers:
            for expert, share in [(rng.randrange(experts), rng.random()) for _ in range(2)]:
                if rng.random() < 0.3:
                    policy.predict((layer, expert), share)
            for expert in rng.sample(range(experts), rng.choice([1, 2, 3])):
                choices += use_checking_evictions(
                    table, (layer, expert), rng, pinned, check, prefetch=rng.random() < 0.2
                )
            policy.clear_predictions(layer)
    assert choices > 200


def test_numba_loads_with_the_first_choice_not_before():
    """vLLM's worker fails to start once numba is loaded (see `wait_scoring`): the engine's
    modules and a policy's bookkeeping must not load it; the first choice does."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import vllm_expertflow.core.engine\n"
        "from vllm_expertflow.core.page_table import PageTable\n"
        "from vllm_expertflow.core.policy import PredictivePolicy\n"
        "table = PageTable(2, PredictivePolicy())\n"
        "table.allocate((0, 0)); table.allocate((1, 0))\n"
        "print('numba' in sys.modules)\n"
        "table.allocate((2, 0))\n"
        "print('numba' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "True"]
    # The engine prepares its policy once the pool is built (in vLLM's worker, after start-up),
    # so the first eviction while serving does not load it.
    code = (
        "import sys\n"
        "from vllm_expertflow.core.policy import PredictivePolicy\n"
        "PredictivePolicy().prepare()\n"
        "print('numba' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["True"]
