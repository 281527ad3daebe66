import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg():
    from yxanul.config import load_model_config
    return load_model_config("tiny")


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> str:
    """A 2-layer, 64-wide model YAML on the tiny preset: the smallest model the training tests run."""
    p = tmp_path_factory.mktemp("model") / "micro.yaml"
    p.write_text("preset: tiny\nd_model: 64\nn_layers: 2\nn_heads: 2\nn_kv_heads: 1\nhead_dim: 32\n"
                 "ffn_hidden: 128\nmax_seq_len: 128\n")
    return str(p)
