"""bench/timeline.py: the per-call kernel summary that bench/decode.py --profile appends to its GPU tables."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import timeline  # noqa: E402


def write_trace(path: Path, kernels: list[tuple[str, float, float]]) -> Path:
    """kernels: (name, start us, duration us) -> a Chrome trace with them and a CPU event that must be ignored."""
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": d} for n, ts, d in kernels]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 500.0})
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_summary_per_call(tmp_path):
    # two calls of [a 10 us, gap 1, b 2 us, gap 1, b 2 us]; 100 us of host time between the calls
    call = [("a", 0.0, 10.0), ("b", 11.0, 2.0), ("b", 14.0, 2.0)]
    trace = write_trace(tmp_path / "t.json", call + [(n, ts + 116.0, d) for n, ts, d in call])
    text = timeline.summary(trace, calls=2, top=1)
    lines = text.splitlines()
    assert lines[0].startswith("3 kernels per call, 14.0 us of kernel time, 2.0 us of gaps under 50 us")
    assert lines[2].split() == ["10.0", "71.4%", "1.0", "10.00", "a"]  # ranked by total time
    assert lines[3].split()[:3] == ["4.0", "28.6%", "2.0"] and lines[3].endswith("(1 other kernels)")
    assert "aten::mm" not in text


def test_summary_without_kernels(tmp_path):
    assert "no device kernels" in timeline.summary(write_trace(tmp_path / "t.json", []), calls=1)


def test_cli_rejects_bad_counts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["timeline.py", str(tmp_path / "t.json"), "--calls", "0"])
    with pytest.raises(SystemExit):
        timeline.main()
    assert "--calls" in capsys.readouterr().err
