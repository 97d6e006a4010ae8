"""bench/perf_analyzer.py: the command line, perf_analyzer's CSV, the table, and the report section."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import perf_analyzer as perf
from bench import serving

#: A real `perf_analyzer -f --verbose-csv` file (against tensorgate's add_sub), rows sorted by throughput.
CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,\
Avg latency,request/response,response wait
1,937.776,3,792,26,0,229,3,1,970,1337,1649,2613,1057,4,1042
2,1171.3,3,1280,148,0,258,3,1,1591,2109,2362,5073,1696,4,1681
8,2116.93,3,2551,463,10,727,7,1,3588,5164,5677,6983,3767,4,3752
4,1287.8,4,2483,188,2,407,4,2,2825,3887,4641,8527,3092,6,3074
"""


def test_parse_csv_sorts_by_concurrency_and_reads_every_column() -> None:
    rows = perf.parse_csv(CSV)
    assert [row.concurrency for row in rows] == [1, 2, 4, 8]
    first = rows[0]
    assert first.throughput == pytest.approx(937.776)
    assert (first.p50_us, first.p90_us, first.p99_us, first.avg_us) == (970, 1337, 2613, 1057)
    assert (first.server_queue_us, first.server_compute_input_us) == (26, 0)
    assert (first.server_compute_infer_us, first.server_compute_output_us) == (229, 3)
    assert (first.client_send_us, first.network_server_us, first.client_recv_us) == (3, 792, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Concurrency,Inferences/Second\n1,2\n", "lacks the columns"),
        (CSV.splitlines()[0] + "\n", "no measurements"),
        (CSV.replace("937.776", "fast"), "not numeric"),
    ],
)
def test_bad_csv(text: str, message: str) -> None:
    with pytest.raises(perf.PerfAnalyzerError, match=message):
        perf.parse_csv(text)


def test_command_line_speaks_grpc_with_count_windows(tmp_path: Path) -> None:
    command = perf.build_command(
        Path("/x/perf_analyzer"), "127.0.0.1:9", "mlp", tmp_path / "o.csv", concurrency=(1, 8), requests_per_window=7
    )
    assert command[0] == "/x/perf_analyzer"
    joined = " ".join(command)
    for part in ("-m mlp", "-u 127.0.0.1:9", "-i grpc", "--concurrency-range 1:8:1", "count_windows"):
        assert part in joined
    assert command[command.index("--measurement-request-count") + 1] == "7"
    assert command[command.index("-f") + 1] == str(tmp_path / "o.csv")


def test_a_missing_binary_is_a_perf_analyzer_error() -> None:
    with pytest.raises(perf.PerfAnalyzerError, match="No such file"):
        perf.run("127.0.0.1:9", "mlp", binary=Path("/nonexistent/perf_analyzer"), timeout_s=5)


def test_the_report_has_a_perf_analyzer_section() -> None:
    rows = perf.parse_csv(CSV)
    table = perf.render_table(rows)
    assert table[2].startswith("| 1 | 937.8 | 970 | 1,337 | 2,613 | 1,057 | 26 | 0 | 229 | 3 | 792 |")
    section = serving._render_perf_analyzer(
        {
            "concurrency": [1, 8],
            "models": {"mlp": {"rows": [row.to_dict() for row in rows]}, "resnet18": {"error": "exited 2:\nunstable"}},
        }
    )
    text = "\n".join(section)
    assert "## perf_analyzer over the Open Inference Protocol (gRPC)" in text
    assert "### mlp" in text
    assert "| 8 | 2,116.9 |" in text
    assert "perf_analyzer failed: `exited 2:`" in text
    assert serving._render_perf_analyzer({}) == []
