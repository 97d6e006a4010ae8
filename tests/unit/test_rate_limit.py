"""The per-client token bucket, on a fake clock: pacing, burst, retry hint, idle eviction, bounded memory."""

from __future__ import annotations

import pytest

from tensorgate.server.batching.clock import FakeClock
from tensorgate.server.errors import ResourceExhaustedError
from tensorgate.server.overload import Limits, RateLimiter
from tensorgate.server.overload.interceptor import client_key


def test_burst_then_paced_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2.0, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert limiter.acquire("a") == pytest.approx(0.5)  # one token at 2/s is half a second away
    clock.advance(0.25)
    assert limiter.acquire("a") == pytest.approx(0.25)  # a refusal takes nothing: the wait only shrinks
    clock.advance(0.25)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)


def test_clients_have_their_own_buckets() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, burst=1, clock=clock)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0.0
    assert limiter.acquire("b") == 0.0  # b is not paced by a's traffic


def test_refill_never_exceeds_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, burst=2, clock=clock)
    limiter.acquire("a")
    clock.advance(3600.0)
    assert [limiter.acquire("a") == 0.0 for _ in range(3)] == [True, True, False]


def test_default_burst_is_one_second_of_the_rate_and_at_least_one() -> None:
    assert RateLimiter(5.0).burst == 5.0
    assert RateLimiter(2.5).burst == 3.0
    assert RateLimiter(0.2).burst == 1.0


def test_check_raises_resource_exhausted_with_the_wait_as_retry_hint() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4.0, burst=1, clock=clock)
    limiter.check("client-7")
    with pytest.raises(ResourceExhaustedError, match="client-7") as caught:
        limiter.check("client-7")
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert caught.value.retry_after == pytest.approx(0.25)


def test_idle_buckets_are_dropped_as_new_clients_come() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, burst=2, clock=clock)
    for name in ("a", "b", "c"):
        limiter.acquire(name)
    assert len(limiter) == 3
    clock.advance(2.0)  # long enough to refill two tokens: a, b and c are as good as new
    limiter.acquire("d")
    assert len(limiter) == 1


def test_bucket_count_is_bounded_even_for_busy_clients() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, burst=1, clock=clock, max_clients=3)
    for index in range(100):
        limiter.acquire(f"client-{index}")
    assert len(limiter) == 3
    # The most recent clients are the ones kept: client-99 is still paced.
    assert limiter.acquire("client-99") > 0.0


def test_a_recently_seen_client_is_kept_over_older_ones() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, burst=1, clock=clock, max_clients=2)
    limiter.acquire("old")
    limiter.acquire("busy")
    limiter.acquire("old")  # seen again: now the most recent
    limiter.acquire("new")  # evicts "busy", the least recently seen
    assert limiter.acquire("old") > 0.0  # still its own (empty) bucket


@pytest.mark.parametrize(
    ("rate", "burst", "match"),
    [(0.0, 0, "rate_limit"), (-1.0, 0, "rate_limit"), (float("inf"), 0, "rate_limit"), (1.0, -1, "burst")],
)
def test_nonsensical_settings_are_refused(rate: float, burst: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RateLimiter(rate, burst)


def test_client_key_prefers_the_metadata_entry_then_the_peer_host() -> None:
    def peer() -> str:
        return "ipv4:10.1.2.3:55123"

    assert client_key((("x-client-id", "cam-1"), ("other", "x")), peer, "x-client-id") == "id:cam-1"
    assert client_key((("other", "x"),), peer, "x-client-id") == "peer:ipv4:10.1.2.3"
    assert client_key(None, lambda: "ipv6:[::1]:4000", "x-client-id") == "peer:ipv6:[::1]"
    assert client_key((), lambda: "unix:/tmp/socket", "x-client-id") == "peer:unix:/tmp/socket"
    assert len(client_key((("x-client-id", "y" * 10_000),), peer, "x-client-id")) < 300
    # A verified client certificate outranks the id the client chooses: changing the id does not escape the limit.
    certificate = frozenset({"camera-7", "camera-7.example"})
    assert client_key((("x-client-id", "any"),), peer, "x-client-id", certificate) == "cert:camera-7"


class _Tensor:
    def __init__(self, name: str, shape: list[int]) -> None:
        self.name = name
        self.shape = shape


def test_element_limit_names_the_tensor_and_the_setting() -> None:
    limits = Limits(max_tensor_elements=100)
    limits.check_elements([_Tensor("a", [10, 10]), _Tensor("b", [-1, 2**40])])  # negative: decoding refuses it
    with pytest.raises(Exception, match=r"input 'big'.*101 elements.*max_tensor_elements=100") as caught:
        limits.check_elements([_Tensor("a", [1]), _Tensor("big", [101])])
    assert getattr(caught.value, "code", "") == "INVALID_ARGUMENT"
    Limits().check_elements([_Tensor("huge", [2**40, 2**40])])  # 0: no limit


def test_frame_limit_is_resource_exhausted() -> None:
    Limits(max_frame_bytes=10).check_frame(10)
    with pytest.raises(ResourceExhaustedError, match="max_frame_bytes=10"):
        Limits(max_frame_bytes=10).check_frame(11)
    Limits().check_frame(10**9)


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_request_rows"):
        Limits(max_request_rows=-1)
