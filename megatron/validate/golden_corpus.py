"""The corpus of the golden loss curves, built from files every machine has.

The Python standard library's docstrings, then the source of each of its files (one JSONL
document each, in the sorted order of ``examples_seq_parallel/build_docstring_corpus.py``'s
file walk); a SentencePiece BPE vocabulary trained on its lines (one thread and a fixed,
evenly spaced subset of lines, so the same files give the same ``.model`` bytes); tokenized
with ``tools/preprocess_data.py --append-eod``. Everything lands in one directory under the
work directory, named by a hash of the inputs (file names, sizes and modification times,
vocabulary size, format), and is reused while ``manifest.json`` there exists.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
FORMAT = 1  # bump when the corpus, tokenizer or preprocessing recipe changes
MIN_DOCSTRING_CHARS = 40
MIN_LINE_CHARS = 8  # tokenizer training: shorter lines (mostly punctuation) are left out
SPM_MAX_LINES = 200_000  # train_sentencepiece's input_sentence_size: all lines are then used


@dataclass(frozen=True)
class CorpusSpec:
    """What the corpus is built from: the first ``max_files`` stdlib files (None: all)."""

    vocab_size: int = 8192
    max_files: int | None = None
    stdlib: str = sysconfig.get_paths()["stdlib"]


@dataclass
class Corpus:
    """A built corpus: paths, SHA-256 of the JSONL and of the tokenizer, sizes."""

    directory: str
    jsonl: str
    tokenizer_model: str
    data_prefix: str
    corpus_sha256: str
    tokenizer_sha256: str
    files: int
    documents: int
    characters: int
    tokens: int
    build_seconds: float
    stdlib: str


def _example(name: str) -> ModuleType:
    """A script of ``examples_seq_parallel/`` imported as a module."""
    path = REPO / "examples_seq_parallel" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_golden_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_files(spec: CorpusSpec) -> list[str]:
    """The stdlib ``.py`` files of the corpus, in the example script's sorted order."""
    files = list(_example("build_docstring_corpus").stdlib_files(spec.stdlib))
    return files[: spec.max_files] if spec.max_files is not None else files


def corpus_key(spec: CorpusSpec, files: list[str]) -> str:
    """Hash of everything the build depends on; a change gives a new directory."""
    stats = [
        (os.path.relpath(p, spec.stdlib), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files
    ]
    text = json.dumps([FORMAT, asdict(spec), SPM_MAX_LINES, stats], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_corpus(files: list[str], jsonl: str, text: str) -> tuple[int, int]:
    """Write the JSONL and the tokenizer's training lines; return (documents, characters)."""
    docstrings = _example("build_docstring_corpus").docstrings
    texts = [d for p in files for d in docstrings(p, MIN_DOCSTRING_CHARS)]
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError):
            continue
    lines: list[str] = []
    with open(jsonl, "w", encoding="utf-8") as out:
        for doc in texts:
            out.write(json.dumps({"text": doc}) + "\n")
            lines += [
                " ".join(x.split()) for x in doc.splitlines() if len(x.strip()) >= MIN_LINE_CHARS
            ]
    step = -(-len(lines) // SPM_MAX_LINES)  # evenly spaced, at most SPM_MAX_LINES of them
    with open(text, "w", encoding="utf-8") as out:
        out.writelines(line + "\n" for line in lines[::step])
    return len(texts), sum(len(t) for t in texts)


def train_tokenizer(directory: str, text: str, vocab_size: int) -> str:
    """``train_sentencepiece.py`` on one thread (the model depends on the thread count), run
    in ``directory`` with relative names: the ``.model`` file embeds its input's path."""
    cmd = [
        sys.executable,
        str(REPO / "examples_seq_parallel" / "train_sentencepiece.py"),
        "--input",
        os.path.basename(text),
        "--model-prefix",
        "spm",
        "--vocab-size",
        str(vocab_size),
        "--threads",
        "1",
    ]
    _run(cmd, directory, "train_sentencepiece.py")
    return os.path.join(directory, "spm.model")


def _run(cmd: list[str], cwd: str | Path, name: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed ({out.returncode}):\n{out.stderr[-3000:]}")


def preprocess(jsonl: str, model: str, prefix: str, workers: int) -> None:
    """``tools/preprocess_data.py`` in a child process; raises with its output on failure."""
    cmd = [
        sys.executable,
        str(REPO / "tools" / "preprocess_data.py"),
        "--input",
        jsonl,
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "GPTSentencePieceTokenizer",
        "--tokenizer-model",
        model,
        "--append-eod",
        "--workers",
        str(workers),
        "--log-interval",
        "1000000",
    ]
    _run(cmd, REPO, "preprocess_data.py")


def count_tokens(prefix: str) -> int:
    from megatron.data.indexed_dataset import MMapIndexedDataset

    return int(MMapIndexedDataset(prefix).sizes.sum(dtype="int64"))


def _moved_to(corpus: Corpus, directory: str) -> Corpus:
    """The cached corpus with its paths under ``directory`` (the work directory may move)."""
    for name in ("jsonl", "tokenizer_model", "data_prefix"):
        setattr(corpus, name, os.path.join(directory, os.path.basename(getattr(corpus, name))))
    corpus.directory = directory
    return corpus


def prepare(work: str, spec: CorpusSpec, workers: int) -> tuple[Corpus, bool]:
    """The corpus for ``spec`` under ``work``, built unless cached; (corpus, reused)."""
    files = source_files(spec)
    directory = os.path.join(os.path.abspath(work), f"corpus-{corpus_key(spec, files)}")
    manifest = os.path.join(directory, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            corpus = Corpus(**json.load(f))
        return _moved_to(corpus, directory), True
    start = time.time()
    shutil.rmtree(directory, ignore_errors=True)  # a build cut short leaves no manifest
    os.makedirs(directory)
    jsonl = os.path.join(directory, "corpus.jsonl")
    text = os.path.join(directory, "tokenizer_lines.txt")
    documents, characters = write_corpus(files, jsonl, text)
    model = train_tokenizer(directory, text, spec.vocab_size)
    data = os.path.join(directory, "data")
    preprocess(jsonl, model, data, workers)
    data_prefix = data + "_text_document"
    corpus = Corpus(
        directory=directory,
        jsonl=jsonl,
        tokenizer_model=model,
        data_prefix=data_prefix,
        corpus_sha256=sha256_file(jsonl),
        tokenizer_sha256=sha256_file(model),
        files=len(files),
        documents=documents,
        characters=characters,
        tokens=count_tokens(data_prefix),
        build_seconds=round(time.time() - start, 1),
        stdlib=spec.stdlib,
    )
    with open(manifest + ".tmp", "w", encoding="utf-8") as f:
        json.dump(asdict(corpus), f, indent=1)
    os.replace(manifest + ".tmp", manifest)
    return corpus, False
