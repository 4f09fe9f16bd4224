"""The examples' data loaders (WikiText raw, SQuAD JSON, ImageNet-style folders) on small fixture files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asymstore_examples import data as D  # examples/ is on pytest's pythonpath (pyproject.toml)

# WikiText's raw format: headings end with a space (kept explicit here)
WIKI = "\n".join(
    [
        " = Valkyria Chronicles III = ",
        "",
        " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game .",
        " The game began development in 2010 , carrying over a large portion of the work .",
        "",
        " = = Gameplay = = ",
        "",
        " As with previous Valkyira Chronicles games , Valkyria Chronicles III is a tactical game .",
        "",
    ]
)


def test_byte_tokenizer_roundtrip() -> None:
    t = D.ByteTokenizer()
    s = "Senjō no Valkyria — 3"
    ids = t.encode(s)
    assert len(ids) == len(s.encode("utf-8")) and min(ids) >= t.OFFSET and max(ids) < t.vocab_size
    assert t.decode(ids) == s
    assert t.decode([t.CLS, *ids, t.SEP, t.PAD]) == s


def test_wikitext_blocks(tmp_path: Path) -> None:
    (tmp_path / "wiki.train.raw").write_text(WIKI, encoding="utf-8")
    wt = D.WikiTextBlocks(tmp_path, 32)  # a directory holding wiki.train.raw
    lines = [ln.strip() for ln in WIKI.splitlines() if ln.strip()]
    n_tokens = sum(len(ln.encode("utf-8")) + 1 for ln in lines)
    assert len(wt) == n_tokens // 32 and wt.blocks.shape == (n_tokens // 32, 32)
    text = D.TOKENIZER.decode(wt.blocks.reshape(-1).tolist())
    assert text.startswith("= Valkyria Chronicles III =") and "Senjō" in text
    assert int((wt.blocks == D.ByteTokenizer.SEP).sum()) >= 3  # line separators
    assert torch.equal(D.WikiTextBlocks(tmp_path / "wiki.train.raw", 32).blocks, wt.blocks)  # the file itself
    with pytest.raises(ValueError, match="fewer than one block"):
        D.WikiTextBlocks(tmp_path, 100_000)
    with pytest.raises(FileNotFoundError):
        D.WikiTextBlocks(tmp_path / "nowhere", 32)


def test_causal_and_masked_sources_on_wikitext(tmp_path: Path) -> None:
    (tmp_path / "wiki.train.raw").write_text(WIKI * 4, encoding="utf-8")
    src = D.causal_lm_source(str(tmp_path), batch=3, seq=16, vocab_size=512, seed=1)
    b5 = src.batch(5)
    assert b5["input_ids"].shape == (3, 16) and torch.equal(b5["input_ids"], b5["labels"])
    assert torch.equal(src.batch(5)["input_ids"], b5["input_ids"])  # a pure function of the batch number
    m = D.masked_lm_source(str(tmp_path), batch=8, seq=16, vocab_size=512, seed=1).batch(0)
    masked = m["labels"] != -100
    assert masked.any() and (m["input_ids"][masked] == D.ByteTokenizer.MASK).any()
    assert (m["input_ids"][~masked] != D.ByteTokenizer.MASK).all()  # only predicted tokens are masked
    assert (m["labels"][masked] >= D.ByteTokenizer.OFFSET).all()  # special tokens (line ends) never predicted
    with pytest.raises(ValueError, match="vocab_size"):
        D.causal_lm_source(str(tmp_path), batch=1, seq=16, vocab_size=100, seed=0)


def test_batch_indices_cover_each_epoch() -> None:
    n, b = 10, 4
    seen = [i for k in range(5) for i in D.batch_indices(k, b, n, seed=3)]  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new permutation each epoch
    assert D.batch_indices(3, b, n, seed=3) == D.batch_indices(3, b, n, seed=3)


def _squad(version: str) -> dict:
    ctx = (
        "Architecturally, the school has a Catholic character. Atop the Main Building's gold dome is a "
        "golden statue of the Virgin Mary — Notre Dame's Dôme d'or."
    )
    qas = [
        {
            "id": "q1",
            "question": "What sits on top of the Main Building?",
            "answers": [{"text": "a golden statue of the Virgin Mary", "answer_start": ctx.index("a golden")}],
        },
        {
            "id": "q2",
            "question": "What is the dome called?",  # after non-ASCII text: bytes != characters
            "answers": [{"text": "Dôme d'or", "answer_start": ctx.index("Dôme") - 2}],
        },  # off by two, as in some files
    ]
    if version == "v2.0":
        qas.append({"id": "q3", "question": "Who built the dome?", "answers": [], "is_impossible": True})
    return {
        "version": version,
        "data": [{"title": "University_of_Notre_Dame", "paragraphs": [{"context": ctx, "qas": qas}]}],
    }


@pytest.mark.parametrize("version", ["v1.1", "v2.0"])
def test_squad(tmp_path: Path, version: str) -> None:
    p = tmp_path / f"train-{version}.json"
    p.write_text(json.dumps(_squad(version), ensure_ascii=False), encoding="utf-8")
    ex = D.read_squad(tmp_path)  # a directory holding train-v*.json
    assert [e.id for e in ex] == ["q1", "q2"] + (["q3"] if version == "v2.0" else [])
    for e in ex:
        if e.answer_text:
            assert e.context[e.answer_start : e.answer_start + len(e.answer_text)] == e.answer_text
    feats = D.SquadFeatures(ex, 256)
    for i, e in enumerate(ex):
        s, t = int(feats.start_positions[i]), int(feats.end_positions[i])
        if e.answer_text:
            assert D.TOKENIZER.decode(feats.input_ids[i, s : t + 1].tolist()) == e.answer_text
            assert feats.token_type_ids[i, s] == 1 and feats.attention_mask[i, t] == 1
        else:
            assert s == t == 0  # unanswerable: the CLS token
    assert feats.input_ids[0, 0] == D.ByteTokenizer.CLS
    short = D.SquadFeatures(ex, 48)  # answers cut off by truncation point at CLS too
    assert int(short.start_positions[0]) == 0 and short.input_ids.shape == (len(ex), 48)
    src = D.squad_source(str(p), batch=4, seq=256, vocab_size=512, seed=0)
    b = src.batch(1)
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
    assert b["input_ids"].shape == (4, 256) and src.n == len(ex)


def test_squad_rejects_other_json(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a SQuAD file"):
        D.read_squad(tmp_path / "x.json")


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "imagenet" / "train"
    specs = {
        "n01440764": [("a.JPEG", "RGB", (40, 30)), ("b.png", "L", (20, 50))],
        "n01443537": [("c.JPEG", "RGB", (64, 64)), ("d.png", "RGBA", (33, 17)), ("notes.txt", None, None)],
    }
    for cls, files in specs.items():
        (root / cls).mkdir(parents=True)
        for name, mode, size in files:
            if mode is None:
                (root / cls / name).write_text("not an image")
                continue
            im = Image.new(
                mode, size, color=(255, 0, 0) if mode == "RGB" else (128 if mode == "L" else (0, 0, 255, 255))
            )
            im.save(root / cls / name)
    assert D.count_classes(tmp_path / "imagenet") == 2
    f = D.ImageFolder(tmp_path / "imagenet", 24)  # finds train/ itself
    assert f.classes == ["n01440764", "n01443537"] and len(f) == 4
    x, y = f.load(0)
    assert x.shape == (3, 24, 24) and y == 0
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD)
    assert torch.allclose(x[:, 12, 12], red, atol=0.1)  # JPEG is lossy by a few levels
    b = f.rows([0, 1, 2, 3])
    assert b["pixel_values"].shape == (4, 3, 24, 24) and b["labels"].tolist() == [0, 0, 1, 1]
    src, classes = D.image_source(str(tmp_path / "imagenet"), batch=3, image_size=16, num_labels=2, seed=0)
    assert classes == f.classes and src.batch(2)["pixel_values"].shape == (3, 3, 16, 16)
    assert torch.equal(src.batch(2)["labels"], src.batch(2)["labels"])
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        D.ImageFolder(tmp_path / "empty", 8)


def test_synthetic_sources_are_deterministic() -> None:
    for make in (D.causal_lm_source, D.masked_lm_source, D.squad_source):
        s = make(None, batch=2, seq=32, vocab_size=300, seed=5)
        a, b, c = s.batch(7), s.batch(7), s.batch(8)
        assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["input_ids"], c["input_ids"])
        assert int(a["input_ids"].max()) < 300
    q = D.squad_source(None, batch=16, seq=64, vocab_size=300, seed=0).batch(0)
    assert (q["start_positions"] <= q["end_positions"]).all() and (q["end_positions"] < 64).all()
    im, _ = D.image_source(None, batch=2, image_size=8, num_labels=5, seed=0)
    assert im.batch(0)["pixel_values"].shape == (2, 3, 8, 8) and int(im.batch(0)["labels"].max()) < 5
