import os

import pytest


def pytest_configure(config):
    # Tiny models are built once and kept in pytest's cache folder (inside the checkout, git-ignored), never in the
    # user's home; a fresh clone (CI) builds them again.
    if "SM120_QUANT_CACHE" not in os.environ:
        os.environ["SM120_QUANT_CACHE"] = str(config.cache.mkdir("sm120-quant"))


@pytest.fixture(scope="session")
def tiny_glm47():
    from sm120_quant.models.tiny import build_tiny_model

    return build_tiny_model("glm47")


@pytest.fixture(scope="session")
def tiny_glm47_flash():
    from sm120_quant.models.tiny import build_tiny_model

    return build_tiny_model("glm47-flash")
