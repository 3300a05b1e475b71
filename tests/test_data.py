import json

import pytest
import torch

from mightylm.data import DataError
from mightylm.data.loader import IGNORE, Loader
from mightylm.data.pretrain import TokenStream
from mightylm.data.sft import SFTDataset
from mightylm.data.synthetic import generate_task

from conftest import SAMPLE_TEXT


def test_synthetic_tasks_are_seeded_and_correct():
    a = generate_task("addition", 50, seed=1, size=4)
    assert a == generate_task("addition", 50, seed=1, size=4)
    assert a != generate_task("addition", 50, seed=2, size=4)
    for ex in a:
        x, y = ex["input"].split(" + ")
        assert len(x) == len(y) == 4 and int(ex["output"]) == int(x) + int(y)
    for ex in generate_task("multiplication", 20, size=3):
        x, y = ex["input"].split(" * ")
        assert int(ex["output"]) == int(x) * int(y)
    for ex in generate_task("reverse", 20):
        assert ex["output"] == ex["input"][::-1]
    for ex in generate_task("sort", 20):
        assert ex["output"].split() == sorted(ex["input"].split(), key=int)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        generate_task("nope", 1)


def test_token_stream_builds_once_and_rebuilds_on_change(tmp_path, bpe_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(SAMPLE_TEXT * 5)
    (corpus / "b.jsonl").write_text(json.dumps({"text": "Second document."}) + "\n\n" + json.dumps({"text": "Third."}) + "\n")
    stream = TokenStream.build([corpus], bpe_tokenizer, tmp_path / "cache", progress=False)
    expected = bpe_tokenizer.encode(SAMPLE_TEXT * 5, add_special_tokens=False) + [bpe_tokenizer.eos_id]
    assert list(stream.tokens[: len(expected)]) == expected
    meta = json.loads((tmp_path / "cache" / "tokens.json").read_text())
    assert meta["documents"] == 3 and meta["tokens"] == len(stream)
    stamp = (tmp_path / "cache" / "tokens.bin").stat().st_mtime_ns
    TokenStream.build([corpus], bpe_tokenizer, tmp_path / "cache", progress=False)
    assert (tmp_path / "cache" / "tokens.bin").stat().st_mtime_ns == stamp  # reused, not rewritten
    (corpus / "a.txt").write_text(SAMPLE_TEXT * 6)
    again = TokenStream.build([corpus], bpe_tokenizer, tmp_path / "cache", progress=False)
    assert len(again) > len(stream)


def test_windows_split_and_shift(tmp_path, bpe_tokenizer):
    (tmp_path / "a.txt").write_text(SAMPLE_TEXT * 20)
    stream = TokenStream.build([tmp_path / "a.txt"], bpe_tokenizer, tmp_path / "cache", progress=False)
    train, val = stream.split(seq_len=16, val_fraction=0.1)
    assert len(val) >= 1 and len(train) + len(val) == (len(stream) - 1) // 16
    item = train[3]
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    assert val[0]["input_ids"][0] == stream.tokens[train.last * 16]


def test_pretrain_data_errors(tmp_path, bpe_tokenizer):
    with pytest.raises(DataError, match="no such file or directory"):
        TokenStream.build([tmp_path / "missing"], bpe_tokenizer, tmp_path / "c", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "wrong field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        TokenStream.build([bad], bpe_tokenizer, tmp_path / "c", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="every file is empty"):
        TokenStream.build([empty], bpe_tokenizer, tmp_path / "c", progress=False)


def test_sft_labels_cover_only_the_answer(tmp_path, bpe_tokenizer):
    path = tmp_path / "sft.jsonl"
    rows = [{"instruction": "Reverse the word.", "input": "stressed", "output": "desserts"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Farewell."}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = SFTDataset.from_jsonl(path, bpe_tokenizer, max_len=256)
    answers = []
    for i in range(len(data)):
        labels = data[i]["labels"]
        answers.append(bpe_tokenizer.decode(labels[labels != IGNORE].tolist(), skip_special_tokens=False))
    assert answers[0] == "desserts<|im_end|>\n"
    assert answers[1] == "Hello!<|im_end|>\nFarewell.<|im_end|>\n"
    packed = SFTDataset.from_jsonl(path, bpe_tokenizer, max_len=256, pack=True)
    assert len(packed) == 1 and (packed[0]["labels"] != IGNORE).sum() == sum((d["labels"] != IGNORE).sum() for d in data)
    lengths = sorted((len(data[i]["input_ids"]) for i in range(len(data))), reverse=True)  # longest placed first
    assert packed[0]["documents"].tolist() == [0] * lengths[0] + [1] * lengths[1]  # attention stays within each

    from mightylm.data.loader import collate

    short = {k: v[:lengths[0] + 2] for k, v in packed[0].items()}
    batch = collate([packed[0], short], pad_id=0)
    assert batch["documents"][1].tolist() == [0] * lengths[0] + [1] * 2 + [2] * (sum(lengths) - lengths[0] - 2)


def test_packing_fills_rows_best_fit_and_keeps_every_example_whole():
    import random

    rng = random.Random(0)
    items = [([n] * n, [n] * n) for n in (rng.randint(20, 800) for _ in range(200))]
    data = SFTDataset([(ids + [0], [1] * (len(ids) + 1)) for ids, _ in items], max_len=1024, pack=True)
    total = sum(len(ids) for ids, _ in items)
    assert len(data) <= -(-total // 1024) + 3  # within a few rows of the bound (in order: 108 rows against a bound of 79)
    seen = []
    for row in range(len(data)):
        item = data[row]
        assert len(item["input_ids"]) <= 1024
        for doc in item["documents"].unique():
            ids = item["input_ids"][item["documents"] == doc].tolist()
            assert ids == [ids[0]] * ids[0]  # one whole example per document
            seen.append(ids[0])
    assert sorted(seen) == sorted(len(ids) for ids, _ in items)


@pytest.mark.parametrize("content,message", [
    ('{"instruction": "x"}\n', r"sft.jsonl:1: expected 'messages' .* missing or not a string: output"),
    ('{"instruction": "x", "output": "y"}\n{oops\n', r"sft.jsonl:2: not valid JSON"),
    ('[1, 2]\n', r"sft.jsonl:1: expected a JSON object, got list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"sft.jsonl:1: no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}\n', r"sft.jsonl:1: message 0 must be"),
    ('\n\n', r"sft.jsonl: empty"),
])
def test_sft_errors_name_file_and_line(tmp_path, bpe_tokenizer, content, message):
    path = tmp_path / "sft.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        SFTDataset.from_jsonl(path, bpe_tokenizer)


def test_loader_order_is_seeded_resumable_and_rank_sliced():
    data = [{"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(10)]
    a = Loader(data, 3, seed=5)
    first = [a.next_batch()["input_ids"].flatten().tolist() for _ in range(5)]  # crosses an epoch
    b = Loader(data, 3, seed=5)
    b.next_batch(), b.next_batch()
    c = Loader(data, 3, seed=5)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch()["input_ids"].flatten().tolist() for _ in range(3)] == first[2:]
    ranks = [Loader(data, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    whole = Loader(data, 4, seed=5)
    for _ in range(3):
        parts = [r.next_batch()["input_ids"].flatten().tolist() for r in ranks]
        assert parts[0] + parts[1] == whole.next_batch()["input_ids"].flatten().tolist()
