import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny CPU world (``python -m tip_verl.worlds.tiny``), built by the first run that needs it, once per
    test session."""
    return tmp_path_factory.mktemp("tiny_world")
