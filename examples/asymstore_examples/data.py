"""Data for the examples: a byte-level tokenizer, synthetic batches and three real loaders.

No pretrained tokenizer can be fetched (the examples never download anything), so text is
tokenized by :class:`ByteTokenizer`: a tiny, deterministic byte-level tokenizer (UTF-8 bytes
shifted past five special ids). It is not a subword tokenizer: sequences are longer than with
GPT-2's BPE, which is fine for exercising training and checkpointing.

Every data source is *indexable by batch number*: ``source.batch(k)`` is a pure function of
``k`` (and the seed). The training loop checkpoints the number of batches consumed, so a
resumed run continues with exactly the batches an uninterrupted run would have seen.

Real formats:

* WikiText raw text (``wiki.train.raw``, or a directory holding it): :class:`WikiTextBlocks`.
* SQuAD JSON v1.1 / v2.0 (``train-v1.1.json``, ``train-v2.0.json``): :func:`read_squad`,
  :class:`SquadFeatures`.
* ImageNet-style class folders (``root/<class>/<image>``, or ``root/train/<class>/...``), read
  with PIL: :class:`ImageFolder`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


# --- tokenizer ---------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes -> ids ``byte + 5``; ids 0..4 are PAD, CLS/BOS, SEP/EOS, MASK, UNK."""

    PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
    OFFSET = 5
    vocab_size = 256 + OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", errors="replace")


TOKENIZER = ByteTokenizer()


# --- batch order ---------------------------------------------------------------------
def batch_indices(k: int, batch: int, n: int, seed: int) -> list[int]:
    """Example indices of batch ``k``: epochs of a seeded permutation of ``range(n)``."""
    if n <= 0:
        raise ValueError("empty dataset")
    out: list[int] = []
    first = k * batch
    perm_epoch, perm = -1, torch.empty(0, dtype=torch.long)
    for j in range(first, first + batch):
        epoch, i = divmod(j, n)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            perm_epoch = epoch
        out.append(int(perm[i]))
    return out


def _gen(seed: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * k + 1)


@dataclass
class Source:
    """A batch source: ``batch(k)`` is batch number ``k``; ``n`` examples (0: synthetic, endless)."""

    batch: Callable[[int], Batch]
    n: int
    description: str


# --- masking (RoBERTa / BERT MLM) ----------------------------------------------------------
def mask_tokens(
    ids: torch.Tensor,
    vocab_size: int,
    g: torch.Generator,
    *,
    prob: float = 0.15,
    mask_id: int = ByteTokenizer.MASK,
    special_below: int = ByteTokenizer.OFFSET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking: ``prob`` of the tokens are predicted; of those 80% -> MASK, 10% random, 10% kept."""
    ids = ids.clone()
    labels = ids.clone()
    chosen = (torch.rand(ids.shape, generator=g) < prob) & (ids >= special_below)
    labels[~chosen] = -100
    r = torch.rand(ids.shape, generator=g)
    ids[chosen & (r < 0.8)] = mask_id
    rand_sel = chosen & (r >= 0.8) & (r < 0.9)
    ids[rand_sel] = torch.randint(special_below, vocab_size, ids.shape, generator=g)[rand_sel]
    return ids, labels


# --- WikiText ---------------------------------------------------------------------------
def find_file(path: str | os.PathLike[str], names: tuple[str, ...]) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    for n in names:
        if (p / n).is_file():
            return p / n
    raise FileNotFoundError(f"{p}: expected a file or a directory holding one of {', '.join(names)}")


class WikiTextBlocks:
    """WikiText raw text (``wiki.train.raw``) as fixed-length blocks of byte tokens.

    Like Hugging Face's ``run_clm`` ``group_texts``: the non-empty lines are tokenized,
    concatenated with an EOS between lines, and cut into blocks of ``block_size`` tokens (the
    tail that does not fill a block is dropped).
    """

    NAMES = ("wiki.train.raw", "wiki.train.tokens", "wiki.valid.raw", "wiki.test.raw")

    def __init__(
        self,
        path: str | os.PathLike[str],
        block_size: int,
        *,
        tokenizer: ByteTokenizer = TOKENIZER,
        max_bytes: int | None = None,
    ) -> None:
        self.path = find_file(path, self.NAMES)
        self.block_size = block_size
        ids: list[int] = []
        read = 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                ids.extend(tokenizer.encode(line))
                ids.append(tokenizer.SEP)
                read += len(line)
                if max_bytes is not None and read >= max_bytes:
                    break
        n = len(ids) // block_size
        if n == 0:
            raise ValueError(f"{self.path}: {len(ids)} tokens, fewer than one block of {block_size}")
        self.blocks = torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


# --- SQuAD ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SquadExample:
    id: str
    question: str
    context: str
    answer_text: str  # "" for an unanswerable question (v2.0)
    answer_start: int  # character offset into context; -1 when unanswerable


def read_squad(path: str | os.PathLike[str]) -> list[SquadExample]:
    """Read SQuAD v1.1 or v2.0 JSON; the first answer of each question is its training target."""
    p = find_file(path, ("train-v2.0.json", "train-v1.1.json", "dev-v2.0.json", "dev-v1.1.json"))
    with open(p, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{p}: not a SQuAD file (no top-level 'data' list)")
    out: list[SquadExample] = []
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            ctx = para["context"]
            for qa in para.get("qas", []):
                answers = qa.get("answers") or []
                if qa.get("is_impossible", False) or not answers:
                    out.append(SquadExample(str(qa["id"]), qa["question"], ctx, "", -1))
                    continue
                a = answers[0]
                start = int(a["answer_start"])
                if ctx[start : start + len(a["text"])] != a["text"]:  # some files are off by a few characters
                    found = ctx.find(a["text"], max(start - 20, 0))
                    if found < 0:
                        found = ctx.find(a["text"])
                    start = found
                out.append(SquadExample(str(qa["id"]), qa["question"], ctx, a["text"], start))
    return out


class SquadFeatures:
    """SQuAD examples as ``[CLS] question [SEP] context [SEP]`` byte tokens with answer token positions.

    The question is cut to at most a third of ``max_len``, the context to what is left. An answer
    that does not fit (or an unanswerable question) points at the CLS token (position 0), as in
    Hugging Face's ``run_qa``.
    """

    def __init__(self, examples: list[SquadExample], max_len: int, *, tokenizer: ByteTokenizer = TOKENIZER) -> None:
        if not examples:
            raise ValueError("no SQuAD examples")
        t = tokenizer
        n = len(examples)
        self.input_ids = torch.full((n, max_len), t.PAD, dtype=torch.long)
        self.attention_mask = torch.zeros((n, max_len), dtype=torch.long)
        self.token_type_ids = torch.zeros((n, max_len), dtype=torch.long)
        self.start_positions = torch.zeros(n, dtype=torch.long)
        self.end_positions = torch.zeros(n, dtype=torch.long)
        self.answerable = 0
        for i, ex in enumerate(examples):
            q = t.encode(ex.question)[: max(max_len // 3, 1)]
            room = max_len - len(q) - 3
            c = t.encode(ex.context)[: max(room, 0)]
            ids = [t.CLS, *q, t.SEP, *c, t.SEP]
            ctx0 = len(q) + 2
            self.input_ids[i, : len(ids)] = torch.tensor(ids)
            self.attention_mask[i, : len(ids)] = 1
            self.token_type_ids[i, ctx0 : len(ids)] = 1
            if ex.answer_start >= 0 and ex.answer_text:
                b0 = len(ex.context[: ex.answer_start].encode("utf-8"))  # byte offset = token offset
                b1 = b0 + len(ex.answer_text.encode("utf-8")) - 1
                if b1 < len(c):
                    self.start_positions[i] = ctx0 + b0
                    self.end_positions[i] = ctx0 + b1
                    self.answerable += 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: list[int]) -> Batch:
        return {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "token_type_ids": self.token_type_ids[idx],
            "start_positions": self.start_positions[idx],
            "end_positions": self.end_positions[idx],
        }


# --- ImageNet-style folders --------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolder:
    """Class folders of images (ImageNet's ``train/n01440764/*.JPEG`` layout), decoded with PIL.

    ``root`` may be the split directory itself or hold a ``train/`` one. Classes are the sorted
    sub-directory names; each image is converted to RGB, its shorter side resized to
    ``image_size`` and centre-cropped, then normalised with the ImageNet mean and std.
    """

    def __init__(self, root: str | os.PathLike[str], image_size: int) -> None:
        r = Path(root)
        if (r / "train").is_dir():
            r = r / "train"
        if not r.is_dir():
            raise FileNotFoundError(f"{root}: not a directory of class folders")
        self.root = r
        self.image_size = image_size
        self.classes = sorted(d.name for d in r.iterdir() if d.is_dir())
        self.samples: list[tuple[Path, int]] = []
        for ci, c in enumerate(self.classes):
            for f in sorted((r / c).iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    self.samples.append((f, ci))
        if not self.samples:
            raise ValueError(f"{r}: no images found in class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = self.image_size / min(w, h)
            im = im.resize(
                (max(self.image_size, round(w * s)), max(self.image_size, round(h * s))), Image.Resampling.BILINEAR
            )
            w, h = im.size
            left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        x = x.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std, label

    def rows(self, idx: list[int]) -> Batch:
        items = [self.load(i) for i in idx]
        return {
            "pixel_values": torch.stack([x for x, _ in items]),
            "labels": torch.tensor([y for _, y in items], dtype=torch.long),
        }


# --- sources for the examples ----------------------------------------------------------------
def causal_lm_source(data: str | None, *, batch: int, seq: int, vocab_size: int, seed: int) -> Source:
    """Causal LM batches (``input_ids`` = ``labels``): synthetic tokens, or WikiText blocks."""
    if data is None:

        def synth(k: int) -> Batch:
            x = torch.randint(TOKENIZER.OFFSET, vocab_size, (batch, seq), generator=_gen(seed, k))
            return {"input_ids": x, "labels": x}

        return Source(synth, 0, f"synthetic tokens ({batch}x{seq}, vocab {vocab_size})")
    _need_vocab(vocab_size)
    wt = WikiTextBlocks(data, seq)

    def real(k: int) -> Batch:
        x = wt.blocks[batch_indices(k, batch, len(wt), seed)]
        return {"input_ids": x, "labels": x}

    return Source(real, len(wt), f"WikiText {wt.path} ({len(wt)} blocks of {seq} byte tokens)")


def cycle_lm_source(*, batch: int, seq: int, vocab_size: int, seed: int, period: int = 256) -> Source:
    """Learnable synthetic causal LM batches: windows of one fixed cycle of ``period`` distinct tokens.

    The cycle is a seeded random choice of ``period`` token ids; each row of batch ``k`` starts at a
    seeded random place in it, so the next token is a fixed function of the current one. A model
    first learns which tokens occur (the loss falls from ~ln(vocab) towards ln(period) within a few
    steps), then the successor of each: unlike uniform random tokens, the loss visibly falls.
    """
    if not 1 < period <= vocab_size - TOKENIZER.OFFSET:
        raise ValueError(f"period must be in 2..{vocab_size - TOKENIZER.OFFSET}, got {period}")
    cycle = torch.randperm(vocab_size - TOKENIZER.OFFSET, generator=_gen(seed, -1))[:period] + TOKENIZER.OFFSET

    def get(k: int) -> Batch:
        start = torch.randint(0, period, (batch, 1), generator=_gen(seed, k))
        x = cycle[(start + torch.arange(seq)) % period]
        return {"input_ids": x, "labels": x}

    return Source(get, 0, f"synthetic cycle of {period} tokens ({batch}x{seq}, vocab {vocab_size})")


def masked_lm_source(data: str | None, *, batch: int, seq: int, vocab_size: int, seed: int) -> Source:
    """Masked LM batches (15% of tokens predicted): synthetic tokens, or WikiText blocks."""
    wt = None if data is None else WikiTextBlocks(data, seq)
    if wt is not None:
        _need_vocab(vocab_size)

    def get(k: int) -> Batch:
        g = _gen(seed, k)
        if wt is None:
            x = torch.randint(TOKENIZER.OFFSET, vocab_size, (batch, seq), generator=g)
        else:
            x = wt.blocks[batch_indices(k, batch, len(wt), seed)]
        ids, labels = mask_tokens(x, vocab_size, g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    desc = (
        f"synthetic tokens ({batch}x{seq}, vocab {vocab_size})"
        if wt is None
        else f"WikiText {wt.path} ({len(wt)} blocks of {seq} byte tokens)"
    )
    return Source(get, 0 if wt is None else len(wt), desc + ", 15% masked")


def squad_source(data: str | None, *, batch: int, seq: int, vocab_size: int, seed: int) -> Source:
    """Extractive QA batches (start/end positions): synthetic, or SQuAD v1.1/v2.0 JSON."""
    if data is None:

        def synth(k: int) -> Batch:
            g = _gen(seed, k)
            ids = torch.randint(TOKENIZER.OFFSET, vocab_size, (batch, seq), generator=g)
            ids[:, 0] = TOKENIZER.CLS
            qlen = seq // 4
            ids[:, qlen] = TOKENIZER.SEP
            ids[:, -1] = TOKENIZER.SEP
            tt = torch.zeros_like(ids)
            tt[:, qlen + 1 :] = 1
            start = torch.randint(qlen + 1, seq - 2, (batch,), generator=g)
            end = torch.minimum(start + torch.randint(0, 8, (batch,), generator=g), torch.tensor(seq - 2))
            return {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "token_type_ids": tt,
                "start_positions": start,
                "end_positions": end,
            }

        return Source(synth, 0, f"synthetic question/context pairs ({batch}x{seq}, vocab {vocab_size})")
    _need_vocab(vocab_size)
    feats = SquadFeatures(read_squad(data), seq)

    def real(k: int) -> Batch:
        return feats.rows(batch_indices(k, batch, len(feats), seed))

    return Source(
        real, len(feats), f"SQuAD {data} ({len(feats)} questions, {feats.answerable} answers within {seq} byte tokens)"
    )


def image_source(
    data: str | None, *, batch: int, image_size: int, num_labels: int, seed: int, channels: int = 3
) -> tuple[Source, list[str] | None]:
    """Image classification batches: synthetic, or an ImageNet-style folder (returns its class names)."""
    if data is None:

        def synth(k: int) -> Batch:
            g = _gen(seed, k)
            return {
                "pixel_values": torch.randn(batch, channels, image_size, image_size, generator=g),
                "labels": torch.randint(0, num_labels, (batch,), generator=g),
            }

        return Source(
            synth, 0, f"synthetic images ({batch}x{channels}x{image_size}x{image_size}, {num_labels} classes)"
        ), None
    folder = ImageFolder(data, image_size)

    def real(k: int) -> Batch:
        return folder.rows(batch_indices(k, batch, len(folder), seed))

    return (
        Source(
            real,
            len(folder),
            f"image folder {folder.root} ({len(folder)} images, {len(folder.classes)} classes, {image_size}px)",
        ),
        folder.classes,
    )


def _need_vocab(vocab_size: int) -> None:
    if vocab_size < TOKENIZER.vocab_size:
        raise ValueError(f"the byte tokenizer needs vocab_size >= {TOKENIZER.vocab_size}, the model has {vocab_size}")


def iter_batches(source: Source, start: int = 0) -> Iterator[Batch]:
    k = start
    while True:
        yield source.batch(k)
        k += 1


def to_device(b: Batch, device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


def count_classes(root: str | os.PathLike[str]) -> int:
    """Number of class folders under an ImageNet-style root (or its ``train/``)."""
    r = Path(root)
    if (r / "train").is_dir():
        r = r / "train"
    return sum(1 for d in r.iterdir() if d.is_dir()) if r.is_dir() else 0
