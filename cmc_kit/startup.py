"""What a command does before it starts TensorFlow: import it with its start-up log filtered by
TF_CPP_MIN_LOG_LEVEL (read by `config.tensorflow_log_level`)."""

from __future__ import annotations

import os
import re
import sys

from cmc_kit.config import tensorflow_log_level

# absl/TF native log lines: "I0000 00:00:1795995048.781801   19421 port.cc:153] ..." and the
# older "2025-01-01 12:00:00.000000: I tensorflow/core/...". Letter -> TF_CPP_MIN_LOG_LEVEL.
_NATIVE_LOG = re.compile(r"^(?:(?P<a>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |"
                         r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<b>[IWEF]) )")
_NATIVE_LEVELS = {"I": 0, "W": 1, "E": 2, "F": 3}
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"


def filter_native_log(text: str, min_level: int) -> str:
    """Drops native log lines below `min_level` (and their continuation lines)."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        match = _NATIVE_LOG.match(line)
        if match:
            dropping = _NATIVE_LEVELS[match.group("a") or match.group("b")] < min_level
        elif line.startswith(_ABSL_PREAMBLE):
            if min_level >= 1:
                continue  # this line only
        if not dropping:
            kept.append(line)
    return "".join(kept)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its start-up log filtered by TF_CPP_MIN_LOG_LEVEL.

    TF 2.21 logs "oneDNN custom operations are on" (twice) through absl before its own log
    level is read, so TF_CPP_MIN_LOG_LEVEL alone does not silence it. Native stderr is caught
    during the import and replayed without the lines below the level; anything else (warnings,
    errors) still shows.
    """
    if "tensorflow" in sys.modules:
        return
    min_level = tensorflow_log_level()
    if min_level <= 0:
        import tensorflow  # noqa: F401
        return
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded interpreter)
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = filter_native_log(caught.read().decode("utf-8", "replace"), min_level)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()
