"""Training data: text files -> tokens -> packed fixed-length rows -> shuffled batches (grain).

Each file is one document: [bos] tokens [eos]. Documents are split into a training and a held-out
set by a seeded permutation (whole documents, so no held-out text leaks into training), then each
set is packed: the documents are concatenated and cut into rows of seq_len tokens. Within a row the
documents get segment ids 1, 2, ... (0 marks padding, only at the very end) and positions that
restart at 0 with each document, so a packed row computes the same thing as its documents run one
by one. The packed arrays are cached in the run directory, so a resumed run reads the same rows.

Batches come from a grain pipeline (shuffle by seed, reshuffled every epoch, repeated forever)
whose iterator state is a small dict that checkpoints save and restore.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig

import numpy as np

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
# Parts of the interpreter's library that are not the standard library proper (installed
# packages) or are unusual text (test data with deliberately broken encodings).
_STDLIB_SKIP = ("site-packages", "dist-packages", "test", "tests", "idle_test")


class DataError(ValueError):
    """The corpus or data options are unusable; the message names the file or the limit."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is cut.

    paths: files or directories (directories: every file ending in TEXT_SUFFIXES, recursively);
    empty means the running interpreter's standard library source (*.py), offline and real.
    max_bytes caps the corpus (files taken in sorted order until the cap) to keep runs fast.
    """

    paths: tuple[str, ...] = ()
    max_bytes: int = 4_000_000
    seq_len: int = 256
    eval_fraction: float = 0.05
    seed: int = 0

    def validate(self) -> "DataConfig":
        if self.seq_len < 2:
            raise DataError(f"seq_len must be >= 2 (a token and its target), got {self.seq_len}")
        if self.max_bytes <= 0:
            raise DataError(f"max_bytes must be > 0, got {self.max_bytes}")
        if not 0 <= self.eval_fraction < 1:
            raise DataError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        return self


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _walk(directory: str, suffixes, skip=()) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith(suffixes)]
    return found


def corpus_files(cfg: DataConfig) -> list[str]:
    """The corpus's files in a fixed order, capped at cfg.max_bytes in total."""
    if cfg.paths:
        files = []
        for path in cfg.paths:
            if os.path.isdir(path):
                files += _walk(path, TEXT_SUFFIXES)
            elif os.path.isfile(path):
                files.append(path)
            else:
                raise DataError(f"corpus path {path!r} is neither a file nor a directory")
    else:
        files = _walk(stdlib_dir(), (".py",), _STDLIB_SKIP)
    chosen, total = [], 0
    for f in files:
        size = os.path.getsize(f)
        if size == 0:
            continue
        if total + size > cfg.max_bytes and chosen:
            break
        chosen.append(f)
        total += size
    if not chosen:
        raise DataError(f"no non-empty text files found in {list(cfg.paths) or [stdlib_dir()]}")
    return chosen


def read_documents(files: list[str]) -> list[str]:
    docs = []
    for f in files:
        with open(f, "rb") as fh:
            docs.append(fh.read().decode("utf-8", errors="replace"))
    return docs


def split_documents(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices): a seeded permutation; at least one document on each side
    when eval_fraction > 0 and there are two or more."""
    order = np.random.default_rng(seed).permutation(n)
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    else:
        n_eval = 0
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def encode_documents(tokenizer, docs: list[str]) -> list[np.ndarray]:
    """[bos] + tokens + [eos] per document (bos/eos when the tokenizer has them), int32."""
    encodings = tokenizer.backend.encode_batch(docs, add_special_tokens=False)
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return [np.asarray(head + e.ids + tail, dtype=np.int32) for e in encodings]


def pack_documents(docs: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Concatenate and cut into rows: tokens, segment_ids, positions, each int32 [rows, seq_len].

    A document cut by a row boundary continues in the next row as a new segment (positions
    restart at 0: the next row does not see the first part). The last row is padded with
    segment id 0 (and token 0).
    """
    if not docs:
        return {k: np.zeros((0, seq_len), np.int32) for k in ("tokens", "segment_ids", "positions")}
    tokens = np.concatenate(docs)
    doc_ids = np.concatenate([np.full(len(d), i, np.int64) for i, d in enumerate(docs)])
    rows = -(-len(tokens) // seq_len)
    pad = rows * seq_len - len(tokens)
    tokens = np.pad(tokens, (0, pad)).reshape(rows, seq_len)
    doc_ids = np.pad(doc_ids, (0, pad), constant_values=-1).reshape(rows, seq_len)
    # A new segment starts at each row start and wherever the document changes.
    starts = np.ones_like(doc_ids, dtype=bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
    segment_ids[doc_ids < 0] = 0
    index = np.broadcast_to(np.arange(seq_len), (rows, seq_len))
    start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    positions = (index - start_index).astype(np.int32)
    positions[doc_ids < 0] = 0
    return {"tokens": tokens.astype(np.int32), "segment_ids": segment_ids, "positions": positions}


def byte_level_tokenizer(vocab_size: int):
    """A tokenizer for from-scratch runs: the 256 bytes (ids 0-255), then <|bos|> (256),
    <|eos|> (257), <|pad|> (258) and reserved tokens up to vocab_size. Built with the
    `tokenizers` library (byte-level, no merges), so it saves as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from model.tokenizer import Tokenizer

    if vocab_size < 259:
        raise DataError(f"a byte-level tokenizer needs vocab_size >= 259 (256 bytes + bos, eos, "
                        f"pad), got {vocab_size}")
    byte_of = _byte_of_piece()
    byte_pieces = sorted(pre_tokenizers.ByteLevel.alphabet(), key=byte_of.__getitem__)
    backend = Backend(models.BPE(vocab={p: i for i, p in enumerate(byte_pieces)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"] + [f"<|reserved_{i}|>"
                                                    for i in range(vocab_size - 259)]
    backend.add_special_tokens(specials)
    return Tokenizer(backend, bos_id=256, eos_id=257, pad_id=258, add_bos=True)


def _byte_of_piece() -> dict[str, int]:
    """GPT-2's byte <-> printable character table: piece character -> byte value."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
                 + list(range(0xAE, 0x100)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


@dataclasses.dataclass
class PackedData:
    train: dict[str, np.ndarray]  # int32 [rows, seq_len] each
    eval: dict[str, np.ndarray]
    files: list[str]
    num_documents: int

    @property
    def train_tokens(self) -> int:
        return int((self.train["segment_ids"] > 0).sum())


def _fingerprint(cfg: DataConfig, files: list[str], tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg.seq_len, cfg.eval_fraction, cfg.seed, tokenizer.bos_id,
                         tokenizer.eos_id, tokenizer.vocab_size]).encode())
    h.update(tokenizer.backend.to_str().encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare_data(cfg: DataConfig, tokenizer, cache_dir: str | None = None) -> PackedData:
    """Read, split, tokenize and pack the corpus; cached in cache_dir (keyed by a fingerprint of
    the files, the tokenizer and the options) so a resumed run trains on the same rows."""
    cfg.validate()
    files = corpus_files(cfg)
    key = _fingerprint(cfg, files, tokenizer)
    cache = os.path.join(cache_dir, f"packed-{key}.npz") if cache_dir else None
    if cache and os.path.isfile(cache):
        with np.load(cache) as z:
            arrays = {k: z[k] for k in z.files}
        return PackedData(train={k[6:]: v for k, v in arrays.items() if k.startswith("train_")},
                          eval={k[5:]: v for k, v in arrays.items() if k.startswith("eval_")},
                          files=files, num_documents=len(files))
    docs = encode_documents(tokenizer, read_documents(files))
    train_idx, eval_idx = split_documents(len(docs), cfg.eval_fraction, cfg.seed)
    train = pack_documents([docs[i] for i in train_idx], cfg.seq_len)
    held_out = pack_documents([docs[i] for i in eval_idx], cfg.seq_len)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = cache + ".tmp.npz"
        np.savez(tmp, **{f"train_{k}": v for k, v in train.items()},
                 **{f"eval_{k}": v for k, v in held_out.items()})
        os.replace(tmp, cache)
    return PackedData(train=train, eval=held_out, files=files, num_documents=len(files))


def train_batches(rows: dict[str, np.ndarray], batch_size: int, seed: int):
    """A grain iterator over batches (dicts of int32 [batch_size, seq_len]) of shuffled rows,
    repeated forever with a new order each epoch. `get_state()` / `set_state()` checkpoint it."""
    import grain

    n = len(rows["tokens"])
    if n < batch_size:
        raise DataError(f"the training set has {n} rows of the sequence length but the batch "
                        f"needs {batch_size}; give more text (or raise max_bytes), or lower "
                        f"batch_size / seq_len")
    ds = (grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
          .map(lambda i: {k: v[i] for k, v in rows.items()})
          .batch(batch_size, drop_remainder=True))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def eval_batches(rows: dict[str, np.ndarray], batch_size: int, max_batches: int):
    """The first max_batches batches of the held-out rows, in order; the last one padded with
    empty rows (segment id 0: no targets)."""
    n = len(rows["tokens"])
    batches = []
    for start in range(0, min(n, batch_size * max_batches), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        short = batch_size - len(batch["tokens"])
        if short:
            batch = {k: np.pad(v, ((0, short), (0, 0))) for k, v in batch.items()}
        batches.append(batch)
    return batches
