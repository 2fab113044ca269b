"""Check-upstream step: whether the files of a url source changed on the server since they were
fetched; when some did, ``<resources_dir>/raw/<name>/upstream.json`` is written so that the next
run fetches them again and reruns what follows (:mod:`conv2dlstm.data.upstream`). Not a rule: run it
before a run, or from cron (``make check-upstream``)."""

from __future__ import annotations

from typing import Any

from conv2dlstm.config.workflow import raw_dir
from conv2dlstm.data import fetching, upstream


def main(cfg: dict[str, Any], *, download: bool = False) -> upstream.Report:
    """Check every file of ``cfg``'s url source upstream, print what changed, and return the report."""
    report = fetching.check_upstream(cfg, out_dir=raw_dir(cfg), download_unknown=download)
    print(report.text())
    return report
