"""A teacher cache build that is stopped, runs out of disk, or meets another build: one line,
nothing that reads as a complete cache, and the shards finished before are kept."""

import signal
from collections import namedtuple

import pytest
from conftest import HeldLock, cache_config, essence_process, wait_until

from essence.config.load import save_config
from essence.errors import EssenceError
from essence.teacher.cache_build import build_cache
from essence.teacher.cache_format import resolve_cache_dir

SHARDS = 2  # records per shard: the fixture data makes five shards


def untimed(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("teacher_pass", "sha256")}


@pytest.fixture(scope="module")
def straight(tokenizer_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "cache"
    config = cache_config(tokenizer_dir, data_file, "model.teacher_cache_k=8")
    return out, build_cache(config, out, shard_records=SHARDS, progress=False)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_build_reads_as_no_cache_and_the_same_command_finishes_it(
        signum, code, straight, tokenizer_dir, data_file, tmp_path):
    config = cache_config(tokenizer_dir, data_file, "model.teacher_cache_k=8")
    save_config(config, tmp_path / "c.yaml")
    out = tmp_path / "cache"
    # The build waits while writing shard 2 until the signal comes, then stops before shard 3.
    process = essence_process(["teacher", "cache", tmp_path / "c.yaml", "--out", out,
                               "--shard-records", SHARDS], fault="write-shard-00002.bin=wait-stop")
    wait_until(lambda: (out / ".shard-00002.bin.tmp").is_file(), process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last == (f"essence: stopped: 3 of 5 shards of the teacher cache {out} are complete (it "
                    "has no manifest yet, so nothing reads it as a cache). Resume with: the same "
                    "essence teacher cache command"), err
    assert "Traceback" not in err and not (out / "manifest.json").exists()
    assert resolve_cache_dir(out) is None and not list(out.glob(".*.tmp"))
    assert not (out / ".essence.lock").exists()
    resumed = build_cache(config, out, shard_records=SHARDS, progress=False)
    assert untimed(resumed) == untimed(straight[1])
    for shard in straight[0].glob("shard-*.bin"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_a_full_disk_mid_build_is_one_line_and_keeps_the_shards_before(
        straight, tokenizer_dir, data_file, tmp_path, monkeypatch):
    config = cache_config(tokenizer_dir, data_file, "model.teacher_cache_k=8")
    out = tmp_path / "cache"
    monkeypatch.setenv("ESSENCE_FAULT", "write-shard-00001.bin=enospc")
    with pytest.raises(EssenceError) as info:
        build_cache(config, out, shard_records=SHARDS, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"could not write {out / 'shard-00001.bin'} (No space left on device)")
    assert "the shards finished before it are kept" in message
    assert (out / "shard-00000.bin").read_bytes() == (straight[0] / "shard-00000.bin").read_bytes()
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    monkeypatch.delenv("ESSENCE_FAULT")
    assert untimed(build_cache(config, out, shard_records=SHARDS, progress=False)) == untimed(
        straight[1])


def test_too_little_free_space_refuses_the_build_before_the_teacher_runs(
        tokenizer_dir, data_file, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("essence.io.shutil.disk_usage", lambda _: usage(10**9, 10**9, 1000))
    monkeypatch.setattr("essence.teacher.cache_build._teacher",
                        lambda *a: pytest.fail("the teacher was loaded"))
    config = cache_config(tokenizer_dir, data_file, "model.teacher_cache_k=8")
    with pytest.raises(EssenceError, match=r"has 1000 B free, but the teacher cache needs about"):
        build_cache(config, tmp_path / "cache", shard_records=SHARDS, progress=False)
    assert not list((tmp_path / "cache").glob("shard-*"))


def test_a_second_build_into_a_folder_being_built_is_refused(tokenizer_dir, data_file, tmp_path,
                                                             capsys):
    from essence.cli import main

    config_file = tmp_path / "c.yaml"
    save_config(cache_config(tokenizer_dir, data_file, "model.teacher_cache_k=8"), config_file)
    out = tmp_path / "cache"
    with HeldLock(out) as other:
        code = main(["teacher", "cache", str(config_file), "--out", str(out)])
        err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"in use by another teacher cache build (pid {other.pid} on " in err
    assert not (out / "build.json").exists() and not list(out.glob("shard-*"))
    assert main(["teacher", "cache", str(config_file), "--out", str(out)]) == 0
