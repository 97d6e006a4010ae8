"""bench.h2load: the gRPC frame, the concurrency mapping, and parsing h2load's real output.

Every sample below is h2load 1.52.0 (Debian 12's nghttp2-client) output captured verbatim on this project's
machines, driving `/tensorgate.v1.Predict/Predict` on the reference server or tensorgate:

- MLP_C1_M16: `-n 2000 -c 1 -m 16`, MLP, batch 1, request_id "bench" (64-byte response frames);
- MLP_C4_M4: `-n 300 -c 4 -m 4`, the same;
- GRPC_ERRORS: a body that is not a PredictRequest: every call a gRPC error, every one HTTP 200 with no DATA;
- REFUSED: nothing listening on the port;
- SERVER_KILLED: the server SIGKILLed half a second into `-n 100000 -c 1 -m 8`;
- RESNET_C1_M64: `-n 128 -c 1 -m 64` against tensorgate, ResNet-18 (4045-byte frames; latencies in seconds);
- DURATION_MODE: `-D 2 --warm-up-time 1 -c 1 -m 16`, MLP: traffic includes the warm-up, requests do not;
- LOG_SAMPLE: the first rows of MLP_C1_M16's `--log-file`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bench import h2load
from bench.h2load import H2loadError, H2loadResult, H2loadRun, LogRecord, ResponseCheckError

MLP_C1_M16 = """\
starting benchmark...
spawning thread #0: 1 total client(s). 2000 total requests
Application protocol: h2c
progress: 10% done
progress: 20% done
progress: 30% done
progress: 40% done
progress: 50% done
progress: 60% done
progress: 70% done
progress: 80% done
progress: 90% done
progress: 100% done

finished in 576.97ms, 3466.41 req/s, 415.04KB/s
requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 2000 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 239.46KB (245211) total, 5.93KB (6075) headers (space savings 96.25%), 125.00KB (128000) data
                     min         max         mean         sd        +/- sd
time for request:      580us     14.30ms      4.57ms      1.30ms    86.75%
time for connect:     1.25ms      1.25ms      1.25ms         0us   100.00%
time to 1st byte:     4.56ms      4.56ms      4.56ms         0us   100.00%
req/s           :    3469.52     3469.52     3469.52        0.00   100.00%
"""

MLP_C4_M4 = """\
starting benchmark...
spawning thread #0: 4 total client(s). 300 total requests
Application protocol: h2c
progress: 10% done
progress: 20% done
progress: 30% done
progress: 40% done
progress: 50% done
progress: 60% done
progress: 70% done
progress: 80% done
progress: 90% done
progress: 100% done

finished in 103.29ms, 2904.39 req/s, 349.30KB/s
requests: 300 total, 300 started, 300 done, 300 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 300 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 36.08KB (36946) total, 1.17KB (1200) headers (space savings 95.06%), 18.75KB (19200) data
                     min         max         mean         sd        +/- sd
time for request:      608us      8.26ms      5.24ms      1.23ms    78.33%
time for connect:      283us       780us       458us       221us    75.00%
time to 1st byte:     2.58ms      5.88ms      4.03ms      1.54ms    75.00%
req/s           :     730.85      744.47      737.75        5.68    50.00%
"""

GRPC_ERRORS = """\
starting benchmark...
spawning thread #0: 1 total client(s). 20 total requests
Application protocol: h2c
progress: 10% done
progress: 20% done
progress: 30% done
progress: 40% done
progress: 50% done
progress: 60% done
progress: 70% done
progress: 80% done
progress: 90% done
progress: 100% done

finished in 7.34ms, 2725.17 req/s, 501.79KB/s
requests: 20 total, 20 started, 20 done, 20 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 20 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 3.68KB (3771) total, 3.25KB (3324) headers (space savings 19.71%), 0B (0) data
                     min         max         mean         sd        +/- sd
time for request:      534us      1.95ms       902us       357us    80.00%
time for connect:     1.85ms      1.85ms      1.85ms         0us   100.00%
time to 1st byte:     2.92ms      2.92ms      2.92ms         0us   100.00%
req/s           :    2871.16     2871.16     2871.16        0.00   100.00%
"""

REFUSED = """\
starting benchmark...
spawning thread #0: 1 total client(s). 20 total requests

finished in 3.16ms, 0.00 req/s, 0B/s
requests: 20 total, 0 started, 0 done, 0 succeeded, 20 failed, 20 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 0B (0) total, 0B (0) headers (space savings 0.00%), 0B (0) data
                     min         max         mean         sd        +/- sd
time for request:        0us         0us         0us         0us     0.00%
time for connect:        0us         0us         0us         0us     0.00%
time to 1st byte:        0us         0us         0us         0us     0.00%
req/s           :       0.00        0.00        0.00        0.00   100.00%
"""

SERVER_KILLED = """\
starting benchmark...
spawning thread #0: 1 total client(s). 100000 total requests
Application protocol: h2c

finished in 504.98ms, 2695.16 req/s, 323.38KB/s
requests: 100000 total, 1369 started, 1361 done, 1361 succeeded, 98639 failed, 98639 errored, 0 timeout
status codes: 1361 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 163.30KB (167221) total, 4.06KB (4158) headers (space savings 96.23%), 85.06KB (87104) data
                     min         max         mean         sd        +/- sd
time for request:     2.32ms      8.64ms      2.91ms       578us    93.02%
time for connect:      218us       218us       218us         0us   100.00%
time to 1st byte:     5.39ms      5.39ms      5.39ms         0us   100.00%
req/s           :    2694.03     2694.03     2694.03        0.00   100.00%
"""

RESNET_C1_M64 = """\
starting benchmark...
spawning thread #0: 1 total client(s). 128 total requests
Application protocol: h2c
progress: 9% done
progress: 18% done
progress: 28% done
progress: 37% done
progress: 46% done
progress: 56% done
progress: 65% done
progress: 75% done
progress: 84% done
progress: 93% done

finished in 7.58s, 16.88 req/s, 67.64KB/s
requests: 128 total, 128 started, 128 done, 128 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 128 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 513.02KB (525330) total, 459B (459) headers (space savings 95.57%), 505.63KB (517760) data
                     min         max         mean         sd        +/- sd
time for request:   591.33ms       4.72s       3.08s       1.15s    68.75%
time for connect:      863us       863us       863us         0us   100.00%
time to 1st byte:   592.33ms    592.33ms    592.33ms         0us   100.00%
req/s           :      16.88       16.88       16.88        0.00   100.00%
"""

DURATION_MODE = """\
starting benchmark...
spawning thread #0: 1 total client(s). Timing-based test with 1s of warm-up time and 2s of main duration for measurements.
Warm-up started for thread #0.
progress: 100% of clients started
Application protocol: h2c
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 3.00s, 3340.00 req/s, 400.45KB/s
requests: 6680 total, 6680 started, 6680 done, 6680 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 6680 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 800.90KB (820122) total, 28.83KB (29517) headers (space savings 96.29%), 613.38KB (628096) data
                     min         max         mean         sd        +/- sd
time for request:      513us     10.50ms      4.78ms       730us    85.36%
time for connect:        0us         0us         0us         0us     0.00%
time to 1st byte:        0us         0us         0us         0us     0.00%
req/s           :    3339.25     3339.25     3339.25        0.00   100.00%
"""  # noqa: E501 (h2load's own line, kept verbatim)

LOG_SAMPLE = (
    "1795301040939818\t200\t3230\n"
    "1795301040939820\t200\t5894\n"
    "1795301040939821\t200\t5916\n"
    "1795301040939822\t200\t5920\n"
)


MLP_FRAME = 64
RESNET_FRAME = 4045


# --- frame and body ---------------------------------------------------------------------------------------


def test_grpc_frame_is_flag_then_big_endian_length_then_message() -> None:
    message = b"\x0a\x03mlp" * 100
    frame = h2load.grpc_frame(message)
    assert frame[0] == 0
    assert struct.unpack(">I", frame[1:5]) == (len(message),)
    assert frame[5:] == message


def test_grpc_frame_of_empty_message() -> None:
    assert h2load.grpc_frame(b"") == b"\x00\x00\x00\x00\x00"


def test_write_body_writes_the_frame(tmp_path: Path) -> None:
    path = h2load.write_body(tmp_path / "req.body", b"abc")
    assert path.read_bytes() == b"\x00\x00\x00\x00\x03abc"


# --- concurrency mapping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4, 16, 64])
def test_one_connection_carries_every_stream(concurrency: int) -> None:
    assert h2load.split_concurrency(concurrency) == (1, concurrency)


@pytest.mark.parametrize(
    ("concurrency", "connections", "expected"),
    [(16, 4, (4, 4)), (64, 16, (16, 4)), (4, 8, (4, 1)), (1, 4, (1, 1))],
)
def test_connections_split_streams_evenly(concurrency: int, connections: int, expected: tuple[int, int]) -> None:
    assert h2load.split_concurrency(concurrency, connections) == expected


@pytest.mark.parametrize(("concurrency", "connections"), [(0, 1), (4, 0), (16, 3)])
def test_bad_concurrency_splits_are_refused(concurrency: int, connections: int) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        h2load.split_concurrency(concurrency, connections)


# --- durations --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0us", 0.0), ("580us", 580e-6), ("14.30ms", 14.30e-3), ("4.72s", 4.72), ("1m", 60.0), ("2h", 7200.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert h2load.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "12", "1.5 parsecs", "ms"])
def test_parse_duration_rejects_non_durations(text: str) -> None:
    with pytest.raises(H2loadError):
        h2load.parse_duration(text)


# --- summaries --------------------------------------------------------------------------------------------


def test_parse_count_based_run() -> None:
    result = h2load.parse_output(MLP_C1_M16)
    assert result.elapsed_s == pytest.approx(0.57697)
    assert result.requests_per_s == pytest.approx(3466.41)
    assert (result.requests_total, result.started, result.done, result.succeeded) == (2000, 2000, 2000, 2000)
    assert (result.failed, result.errored, result.timeout) == (0, 0, 0)
    assert (result.status_2xx, result.status_3xx, result.status_4xx, result.status_5xx) == (2000, 0, 0, 0)
    assert (result.traffic_bytes, result.header_bytes, result.data_bytes) == (245211, 6075, 128000)
    assert result.request_time.min_us == pytest.approx(580)
    assert result.request_time.max_us == pytest.approx(14300)
    assert result.request_time.mean_us == pytest.approx(4570)
    assert result.request_time.sd_us == pytest.approx(1300)
    assert result.request_time.within_sd_pct == pytest.approx(86.75)
    assert result.connect_time.mean_us == pytest.approx(1250)
    assert result.first_byte_time.mean_us == pytest.approx(4560)


def test_parse_several_clients() -> None:
    result = h2load.parse_output(MLP_C4_M4)
    assert result.requests_per_s == pytest.approx(2904.39)
    assert result.succeeded == 300
    assert result.data_bytes == 300 * MLP_FRAME
    assert result.connect_time.sd_us == pytest.approx(221)


def test_parse_latencies_in_seconds_and_traffic_in_bytes_and_kilobytes() -> None:
    result = h2load.parse_output(RESNET_C1_M64)
    assert result.elapsed_s == pytest.approx(7.58)
    assert result.requests_per_s == pytest.approx(16.88)
    assert result.header_bytes == 459
    assert result.data_bytes == 128 * RESNET_FRAME
    assert result.request_time.min_us == pytest.approx(591330)
    assert result.request_time.max_us == pytest.approx(4.72e6)
    assert result.request_time.mean_us == pytest.approx(3.08e6)


def test_parse_refused_connection() -> None:
    result = h2load.parse_output(REFUSED)
    assert (result.started, result.succeeded, result.failed, result.errored) == (0, 0, 20, 20)
    assert result.requests_per_s == 0.0
    assert result.request_time.mean_us == 0.0


def test_to_dict_is_plain_data() -> None:
    as_dict = h2load.parse_output(MLP_C1_M16).to_dict()
    assert as_dict["succeeded"] == 2000
    assert as_dict["request_time"]["mean_us"] == pytest.approx(4570)


@pytest.mark.parametrize("line", ["finished in", "requests:", "status codes:", "traffic:", "time for request:"])
def test_parse_output_names_a_missing_line(line: str) -> None:
    text = "\n".join(row for row in MLP_C1_M16.splitlines() if not row.startswith(line))
    with pytest.raises(H2loadError, match=line.split()[0]):
        h2load.parse_output(text)


# --- response checks --------------------------------------------------------------------------------------


def test_check_accepts_only_successful_responses() -> None:
    h2load.check_responses(h2load.parse_output(MLP_C1_M16), MLP_FRAME)
    h2load.check_responses(h2load.parse_output(MLP_C4_M4), MLP_FRAME)
    h2load.check_responses(h2load.parse_output(RESNET_C1_M64), RESNET_FRAME)


def test_check_catches_grpc_errors_that_h2load_counts_as_successes() -> None:
    result = h2load.parse_output(GRPC_ERRORS)
    assert result.succeeded == result.status_2xx == 20  # h2load's view: all fine
    with pytest.raises(ResponseCheckError, match=r"DATA was 0 bytes .* expected 1280"):
        h2load.check_responses(result, MLP_FRAME, what="mlp")


def test_check_catches_a_different_response_size() -> None:
    with pytest.raises(ResponseCheckError, match=r"65 per successful"):
        h2load.check_responses(h2load.parse_output(MLP_C1_M16), MLP_FRAME + 1)


def test_check_catches_failed_streams() -> None:
    with pytest.raises(ResponseCheckError, match=r"1361 of 100000 requests succeeded \(98639 failed"):
        h2load.check_responses(h2load.parse_output(SERVER_KILLED), MLP_FRAME)
    with pytest.raises(ResponseCheckError, match=r"0 of 20 requests succeeded"):
        h2load.check_responses(h2load.parse_output(REFUSED), MLP_FRAME)


def test_duration_mode_traffic_includes_warm_up_so_it_cannot_be_checked() -> None:
    # Why bench.h2load runs count-based only: 6680 measured requests, but DATA for 9814 64-byte responses.
    result = h2load.parse_output(DURATION_MODE)
    assert result.succeeded == 6680
    assert result.data_bytes == 9814 * MLP_FRAME
    with pytest.raises(ResponseCheckError):
        h2load.check_responses(result, MLP_FRAME)


# --- per-request log --------------------------------------------------------------------------------------


def test_parse_log() -> None:
    records = h2load.parse_log(LOG_SAMPLE)
    assert records[0] == LogRecord(start_us=1795301040939818, status=200, duration_us=3230)
    assert [r.duration_us for r in records] == [3230, 5894, 5916, 5920]


def test_parse_log_ignores_blank_lines_and_extra_columns() -> None:
    records = h2load.parse_log("\n1\t200\t30\textra\n\n")
    assert records == [LogRecord(1, 200, 30)]


@pytest.mark.parametrize("line", ["1\t200", "a\tb\tc"])
def test_parse_log_rejects_bad_rows(line: str) -> None:
    with pytest.raises(H2loadError, match="line 1"):
        h2load.parse_log(line)


def _run(records: list[LogRecord]) -> H2loadRun:
    result: H2loadResult = h2load.parse_output(MLP_C1_M16)
    return H2loadRun(result=result, records=records, output=MLP_C1_M16, command=["h2load"])


def test_latencies_are_milliseconds_of_http_200_rows_only() -> None:
    run = _run([LogRecord(1, 200, 3230), LogRecord(2, -1, 10), LogRecord(3, 503, 20), LogRecord(4, 200, 500)])
    assert run.latencies_ms == [3.23, 0.5]


# --- command line -----------------------------------------------------------------------------------------


def test_build_command() -> None:
    command = h2load.build_command(
        "http://127.0.0.1:5/tensorgate.v1.Predict/Predict",
        Path("/tmp/req.body"),
        requests=500,
        clients=2,
        streams=8,
        log_file=Path("/tmp/log"),
    )
    assert command[0] == "h2load"
    assert command[-1] == "http://127.0.0.1:5/tensorgate.v1.Predict/Predict"
    for flag in (
        "--requests=500",
        "--clients=2",
        "--max-concurrent-streams=8",
        "--threads=1",
        "--data=/tmp/req.body",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        "--log-file=/tmp/log",
    ):
        assert flag in command
