"""Hostile data files: every one is read, skipped with a reason, or refused in one line."""

import json

import pytest
from conftest import RECORDS

from essence.cli import main
from essence.data import readers as readers_module
from essence.data.pipeline import DataConfig, prepare
from essence.data.records import read_records
from essence.errors import EssenceError

GOOD = {"problem": "What is 1+1?", "reasoning": "One and one make two.", "answer": "2"}


def write_rows(path, *lines: bytes) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def good(i: int = 0) -> bytes:
    return json.dumps(dict(GOOD, id=f"g{i}")).encode()


def test_binary_garbage_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "garbage.jsonl"
    path.write_bytes(bytes(range(256)) * 32)  # 8 KB
    with pytest.raises(EssenceError, match=r"garbage.jsonl is binary \(NUL bytes"):
        read_records(str(path))
    code = main(["data", "profile", str(path), "--tokenizer", str(RECORDS.parent / "tokenizers"
                                                                    / "qwen3")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is binary" in err


def test_a_latin1_row_is_skipped_like_a_malformed_one(tmp_path):
    latin1 = json.dumps(dict(GOOD, problem="Café?"), ensure_ascii=False).encode("latin-1")
    source = write_rows(tmp_path / "mixed.jsonl", good(0), latin1, good(2), b'{"broken')
    result = read_records(source)
    assert [r.id for r in result.records] == ["g0", "g2"]
    reasons = [s.reason for s in result.skipped]
    assert reasons[0].startswith("not UTF-8 text (byte 0xe9 at column")
    assert "malformed" in reasons[1]
    with pytest.raises(EssenceError, match=r"mixed.jsonl row 1: not UTF-8 text.*data.on_error"):
        read_records(source, on_error="fail")


def test_a_byte_order_mark_does_not_cost_the_first_row(tmp_path):
    source = write_rows(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + good(0), good(1))
    assert [r.id for r in read_records(source).records] == ["g0", "g1"]
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert len(read_records(str(as_json)).records) == 1
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps([GOOD]).encode().replace(b"One", b"\xe9"))
    with pytest.raises(EssenceError, match=r"latin.json: not UTF-8 text \(byte 0xe9"):
        read_records(str(latin))


def test_an_oversized_row_is_skipped_and_the_rest_still_read(tmp_path, monkeypatch):
    monkeypatch.setattr(readers_module, "MAX_ROW_BYTES", 4096)
    huge = json.dumps(dict(GOOD, reasoning="x" * 20000)).encode()
    source = write_rows(tmp_path / "huge.jsonl", good(0), huge, good(2))
    result = read_records(source)
    assert [r.id for r in result.records] == ["g0", "g2"]
    assert result.skipped[0].reason.startswith("row is longer than")


def test_max_length_has_a_default_so_no_row_is_unbounded(tmp_path, small_tokenizer):
    assert DataConfig().max_length == 32768
    long_row = json.dumps(dict(GOOD, id="long", reasoning="ab " * 40000)).encode()
    source = write_rows(tmp_path / "long.jsonl", good(0), long_row, good(2))
    prepared = prepare(DataConfig(source=source), small_tokenizer)
    assert [r.record_id for r in prepared.rendered] == ["g0", "g2"]
    assert "over data.max_length=32768" in prepared.skipped[0].reason


@pytest.mark.parametrize("content, message", [
    (b"", "holds no rows"),
    (b"\n\n", "holds no rows"),
    (b'{"x": 1}\n[1, 2]\n', r"all 2 rows were skipped, e.g. .*row 0"),
])
def test_an_empty_or_all_bad_file_says_so(content, message, tmp_path, small_tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(EssenceError, match=message):
        prepare(DataConfig(source=str(path), val_fraction=0.5), small_tokenizer)


def test_a_folder_given_as_the_data_file(tmp_path):
    (tmp_path / "shards.jsonl").mkdir()
    for name in ("shards.jsonl", "."):
        with pytest.raises(EssenceError, match="is a folder; pass one .jsonl"):
            read_records(str(tmp_path / name))


@pytest.mark.parametrize("source", ["data.jsnol", "train.jsonl", "./rows", "~/rows.parquet",
                                    "a/b/c", "rows.prquet", "rows.jsonl.gz", "rows.csv"])
def test_local_looking_paths_never_reach_the_hub(source, monkeypatch):
    def no_hub(*args):
        raise AssertionError(f"{source} was sent to the hub")

    monkeypatch.setattr(readers_module, "_rows_hub", no_hub)
    with pytest.raises(EssenceError, match="does not exist|unknown format"):
        read_records(source)


def test_a_near_miss_suffix_gets_a_hint():
    with pytest.raises(EssenceError, match=r"data.jsnol does not exist \(did you mean .jsonl\?\)"):
        read_records("data.jsnol")


@pytest.mark.parametrize("source", ["simplescaling/s1K-1.1", "bespokelabs/Bespoke-Stratos-17k",
                                    "open-r1/OpenR1-Math-220k"])
def test_hub_ids_still_go_to_the_hub(source, monkeypatch):
    seen = []

    def hub(name, config, split):
        seen.append(name)
        yield dict(GOOD), None

    monkeypatch.setattr(readers_module, "_rows_hub", hub)
    assert len(read_records(source).records) == 1 and seen == [source]
