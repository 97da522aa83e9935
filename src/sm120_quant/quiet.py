"""Keep third-party chatter off stdout, which carries our results (the checkpoint path, JSON reports)."""

from __future__ import annotations

import sys
from contextlib import contextmanager, redirect_stdout


@contextmanager
def library_output():
    """ModelOpt prints notices with print(); llm-compressor and compressed-tensors log INFO lines through loguru;
    transformers logs warnings and draws its own progress bars. Inside this block prints go to stderr, the loguru
    loggers of those two packages are off, transformers logs only errors and its bars are off (ours show)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    loguru = _loguru()
    for name in LOGURU_PACKAGES:
        if loguru:
            loguru.disable(name)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        for name in LOGURU_PACKAGES:
            if loguru:
                loguru.enable(name)


LOGURU_PACKAGES = ("llmcompressor", "compressed_tensors")


def _loguru():
    try:
        from loguru import logger
    except ImportError:  # only the llmcompressor extra brings loguru
        return None
    return logger
