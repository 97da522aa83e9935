"""Keep third-party chatter off stdout, which carries our results (the checkpoint path, JSON reports)."""

from __future__ import annotations

import sys
from contextlib import contextmanager, redirect_stdout


@contextmanager
def library_output():
    """ModelOpt and llm-compressor print notices with print(); transformers logs warnings and draws its own progress
    bars. Inside this block prints go to stderr, transformers logs only errors, and its bars are off (ours show)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
