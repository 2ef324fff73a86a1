"""Fixtures shared by the EPLB tests: a synthetic Mixtral whose routers prefer experts by a
Zipf law (afkv.model.tiny.write_zipf_checkpoint), and its spec."""

import pytest

from afkv.model.tiny import write_zipf_checkpoint
from afkv.model.model import open_checkpoint


@pytest.fixture(scope="module")
def zipf_dir(tmp_path_factory):
    return write_zipf_checkpoint(tmp_path_factory.mktemp("zipf") / "m", exponent=1.0, seed=1)


@pytest.fixture(scope="module")
def spec(zipf_dir):
    spec, reader = open_checkpoint(zipf_dir)
    reader.close()
    return spec
