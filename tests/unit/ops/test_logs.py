"""wsgateway/ops/logs.py: the JSON line's time, the mode of a reopened log file, the level a reload reports."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from wsgateway.ops import logs


@pytest.fixture
def restore_logs() -> Iterator[None]:
    files, stream, level = list(logs._files), logs._stream, getattr(logs, "LEVEL", "info")
    yield
    for f in logs._files[len(files):]:
        f.close()
    logs._files[:] = files
    logs._stream = stream
    logs.set_level(level)


def test_json_time_is_rfc3339_with_a_colon_in_the_offset() -> None:
    out = io.StringIO()
    logs.JSONLinesObserver(out, "gw-1")({"log_time": 1796646001.503214, "log_format": "x", "log_namespace": "t"})
    when = json.loads(out.getvalue())["time"]
    # what Go's time.RFC3339Nano, Loki and Vector parse: ...T12:20:01.503214+00:00 (or Z-less -05:00 etc.)
    assert when[-6] in "+-" and when[-3] == ":", when
    assert datetime.fromisoformat(when).timestamp() == pytest.approx(1796646001.503214, abs=1e-6)
    assert len(when.split(".")[1]) == len("503214+00:00")


def test_a_log_file_reopened_after_rotation_is_0644_whatever_the_umask(tmp_path: Path, restore_logs: None) -> None:
    target = tmp_path / "gateway.log"
    old = os.umask(0o022)
    try:
        observer = logs.observer_factory(level="info", fmt="json", file=str(target), node_id="gw-1",
                                         twistd_logfile=None, daemon=False)()
        os.umask(0o077)  # what twistd sets when it daemonizes, after the log file was opened
        os.rename(target, tmp_path / "gateway.log.1")  # logrotate
        assert logs.reopen() >= 1
        observer({"log_format": "after", "log_namespace": "t", "log_level": logs.LogLevel.info})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert "after" in target.read_text()


def test_a_log_file_keeps_the_mode_the_operator_gave_it(tmp_path: Path, restore_logs: None) -> None:
    target = tmp_path / "gateway.log"
    target.touch()
    target.chmod(0o640)
    logs.observer_factory(level="info", fmt="text", file=str(target), node_id="gw-1", twistd_logfile=None,
                          daemon=False)()
    os.rename(target, tmp_path / "gateway.log.1")
    logs.reopen()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


def test_a_reload_reports_the_level_in_effect(restore_logs: None) -> None:
    logs.set_level("info")
    assert logs.level_after_reload("info", "info") == "info"
    assert logs.level_after_reload("info", "warn") == "warn"  # the file changed: the reload applies it
    logs.set_level("debug")  # PUT /admin/log-level
    assert logs.level_after_reload("info", "info") == "debug (set at runtime; the file says info)"
    assert logs.level_after_reload("info", "error") == "error"
