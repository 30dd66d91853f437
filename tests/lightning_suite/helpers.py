"""Stand-in for Lightning's ``tests_fabric.helpers.runif.RunIf`` (which builds on Lightning's private
``_runif_reasons``): only the condition the selected tests use."""

from __future__ import annotations

import sys

import pytest


def RunIf(*, skip_windows: bool = False, linux_only: bool = False):  # noqa: N802 - Lightning's name
    reasons = []
    if skip_windows and sys.platform == "win32":
        reasons.append("unimplemented on Windows")
    if linux_only and sys.platform != "linux":
        reasons.append("only linux")
    return pytest.mark.skipif(condition=bool(reasons), reason=f"Requires: [{' + '.join(reasons)}]")
