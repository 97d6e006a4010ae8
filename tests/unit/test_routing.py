"""Version routing rules: the weighted (canary) choice, pins by header, and the config's checks."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from tensorgate.server.errors import InvalidInputError, ModelConfigError
from tensorgate.server.repository import read_config
from tensorgate.server.repository.routing import (
    DEFAULT_KEY_HEADER,
    DEFAULT_PIN_HEADER,
    RoutingHints,
    VersionRouter,
    routing_hints,
    weighted_choice,
)

CANARY = (
    'name: "m"\n'
    "version_policy { all { } }\n"
    "routing {\n"
    "  weights { key: 1 value: 90 }\n"
    "  weights { key: 2 value: 10 }\n"
    "}\n"
)


def _router(tmp_path: Path, text: str, served: tuple[int, ...] = (1, 2)) -> VersionRouter:
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "config.pbtxt").write_text(text)
    return VersionRouter.from_config(read_config(model), served, model / "config.pbtxt")


def test_a_routing_key_always_gets_the_same_version() -> None:
    weights = [(1, 50), (2, 50)]
    for key in ("alice", "bob", "client-42", ""):
        first = weighted_choice(weights, key)
        assert all(weighted_choice(weights, key) == first for _ in range(20))


def test_keys_spread_over_versions_roughly_by_weight() -> None:
    counts = Counter(weighted_choice([(1, 80), (2, 20)], f"client-{i}") for i in range(2000))
    assert set(counts) == {1, 2}
    assert counts[1] > counts[2] > 0
    assert 0.1 < counts[2] / 2000 < 0.3  # loose: 20% expected


def test_without_a_key_the_choice_is_random_and_follows_the_weights() -> None:
    rng = random.Random(7)
    counts = Counter(weighted_choice([(1, 1), (2, 3)], None, rng) for _ in range(4000))
    assert set(counts) == {1, 2}
    assert 0.6 < counts[2] / 4000 < 0.9  # 75% expected


def test_zero_weights_never_win_and_all_zero_is_no_choice() -> None:
    assert {weighted_choice([(1, 0), (2, 5), (3, 0)], f"k{i}") for i in range(200)} == {2}
    assert weighted_choice([(1, 0), (2, 0)], "k") is None
    assert weighted_choice([], None) is None


def test_choose_skips_versions_that_are_not_ready() -> None:
    router = VersionRouter(((1, 50), (2, 50)))
    hints = routing_hints([(DEFAULT_KEY_HEADER, "k")])
    chosen = {router.choose({1: True, 2: False}, routing_hints([(DEFAULT_KEY_HEADER, f"k{i}")])) for i in range(100)}
    assert chosen == {1}
    # No weighted version ready: the highest ready version serves rather than nothing.
    assert router.choose({1: False, 2: False, 3: True}, hints) == 3
    assert router.choose({1: False, 2: False}, hints) is None
    # Without weights: the highest ready version.
    assert VersionRouter().choose({1: True, 2: True, 3: False}, None) == 2


def test_the_key_header_decides_the_choice() -> None:
    router = VersionRouter(((1, 50), (2, 50)), key_header="x-user")
    ready = {1: True, 2: True}
    picks = {router.choose(ready, routing_hints([("x-user", f"user-{i}")])) for i in range(100)}
    assert picks == {1, 2}
    for i in range(20):
        hints = routing_hints([("x-user", f"user-{i}"), ("user-agent", "test")])
        assert len({router.choose(ready, hints) for _ in range(10)}) == 1


def test_pins_by_header() -> None:
    router = VersionRouter()
    assert router.pinned(routing_hints([(DEFAULT_PIN_HEADER, "2")])) == 2
    assert router.pinned(routing_hints([(DEFAULT_PIN_HEADER, " 7 ")])) == 7
    assert router.pinned(routing_hints([("other", "2")])) is None
    assert router.pinned(None) is None
    assert router.pinned(RoutingHints(((DEFAULT_PIN_HEADER + "-bin", b"2"),))) is None  # binary headers: not read
    for bad in ("two", "0", "-1", "1.5"):
        with pytest.raises(InvalidInputError, match=DEFAULT_PIN_HEADER):
            router.pinned(routing_hints([(DEFAULT_PIN_HEADER, bad)]))
    assert VersionRouter(pin_header="x-v").pinned(routing_hints([("x-v", "3"), (DEFAULT_PIN_HEADER, "1")])) == 3


def test_routing_hints_of_no_metadata_are_none() -> None:
    assert routing_hints(None) is None
    assert routing_hints(()) is None
    assert routing_hints([("a", "b")]) == RoutingHints((("a", "b"),))


def test_config_routing_is_read(tmp_path: Path) -> None:
    router = _router(tmp_path, CANARY.replace("routing {", 'routing {\n  pin_header: "X-Pin" key_header: "x-tenant"'))
    assert router.weights == ((1, 90), (2, 10))
    assert router.pin_header == "x-pin"  # gRPC metadata keys are lowercase
    assert router.key_header == "x-tenant"
    plain = _router(tmp_path, CANARY)
    assert (plain.pin_header, plain.key_header) == (DEFAULT_PIN_HEADER, DEFAULT_KEY_HEADER)
    assert _router(tmp_path, 'name: "m"\n') == VersionRouter()


def test_weights_naming_a_version_not_served_are_a_config_error_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError) as caught:
        _router(tmp_path, CANARY.replace("key: 2", "key: 3"), served=(1, 2))
    message = str(caught.value)
    assert f"{tmp_path / 'm' / 'config.pbtxt'}:5:" in message
    assert "version 3" in message
    assert "served versions: 1, 2" in message


def test_all_zero_weights_are_a_config_error(tmp_path: Path) -> None:
    text = CANARY.replace("value: 90", "value: 0").replace("value: 10", "value: 0")
    with pytest.raises(ModelConfigError, match=r"config\.pbtxt:4: routing weights are all 0"):
        _router(tmp_path, text)


@pytest.mark.parametrize("header", ["grpc-version", "x-v-bin", "x v", "x:v"])
def test_unusable_header_names_are_a_config_error(tmp_path: Path, header: str) -> None:
    with pytest.raises(ModelConfigError, match="pin_header"):
        _router(tmp_path, f'name: "m"\nrouting {{ pin_header: "{header}" }}\n')


def test_an_unknown_routing_field_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"config\.pbtxt:2:\d+: .*weight"):
        _router(tmp_path, 'name: "m"\nrouting { weight { key: 1 value: 1 } }\n')
