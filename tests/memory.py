"""Measure the largest single CPU allocation made while a function runs (nested ops included)."""

from torch.profiler import ProfilerActivity, profile

# Leaf allocator ops: every tensor created on the CPU goes through one of them. (A dispatch mode
# would not do: it sees a custom op as one opaque call, not the temporaries inside it.)
_ALLOCATING = {"aten::empty", "aten::empty_strided", "aten::empty_like"}


def largest_cpu_allocation(fn) -> int:
    """Bytes of the largest tensor allocated on the CPU by ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.name in _ALLOCATING]
    assert sizes, "the profiler must see the allocations"
    return max(sizes)
