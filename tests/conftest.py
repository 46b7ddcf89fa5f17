import pytest
from hydra import compose, initialize_config_dir

from tests.tiny_models import save_tiny_checkpoint, write_tiny_corpus

CONF_DIR = str((__import__("pathlib").Path(__file__).parents[1] / "conf").resolve())


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_assets")
    corpus = write_tiny_corpus(root / "corpus")
    model = save_tiny_checkpoint(root / "llama", "llama", corpus)
    return {"corpus": corpus, "model": model}


@pytest.fixture
def make_cfg(tiny_assets):
    def _make(*overrides):
        base = [
            f"model.path={tiny_assets['model']}",
            "model.name=tiny-llama",
            f"data.path={tiny_assets['corpus']}",
            "data.heldout=[hamlet,macbeth]",
            "data.seq_len=16",
            "data.calib_windows=8",
            "data.eval_windows=6",
            "batch_size=4",
            "progress=false",
            "protocol=centralized",
            "federation.num_clients=2",
        ]
        keys = {o.split("=", 1)[0] for o in overrides}
        base = [o for o in base if o.split("=", 1)[0] not in keys]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=base + list(overrides))

    return _make
