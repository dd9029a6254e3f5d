"""Run folders: never delete or mix an earlier run; results.json is replaced atomically."""

from __future__ import annotations

import json
import os

import pytest

from fedpeft.config import ConfigError
from fedpeft.results import load_results, write_results
from fedpeft.rundir import check_run_dir, prepare_run_dir


def _earlier_run(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"old")
    write_results(run, {"status": "completed", "config": {}, "rounds": [{"round": 0}]})
    return run


def test_a_new_or_empty_folder_is_accepted_and_created(tmp_path):
    assert prepare_run_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "empty").mkdir()
    assert prepare_run_dir(tmp_path / "empty") == tmp_path / "empty"


def test_a_folder_holding_an_earlier_run_is_refused_without_overwrite_and_left_untouched(tmp_path):
    run = _earlier_run(tmp_path)
    with pytest.raises(ConfigError, match="holds an earlier run .*--overwrite"):
        prepare_run_dir(run)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == b"old"
    assert load_results(run)["status"] == "completed"


def test_overwrite_clears_the_earlier_run_so_no_stale_adapter_file_survives(tmp_path):
    run = _earlier_run(tmp_path)
    assert check_run_dir(run, overwrite=True) == run  # the check itself deletes nothing
    assert (run / "results.json").is_file()
    prepare_run_dir(run, overwrite=True)
    assert list(run.iterdir()) == []


def test_a_non_empty_folder_without_a_run_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no fedpeft run"):
        prepare_run_dir(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_results_are_replaced_whole_and_leave_no_temporary_file(tmp_path):
    write_results(tmp_path, {"status": "running", "config": {}, "rounds": []})
    write_results(tmp_path, {"status": "completed", "config": {}, "rounds": [{"round": 0}]})
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert oct((tmp_path / "results.json").stat().st_mode & 0o777) == oct(0o644)


def test_a_write_that_fails_keeps_the_previous_results_file(tmp_path):
    write_results(tmp_path, {"status": "running", "config": {}, "rounds": []})
    before = (tmp_path / "results.json").read_bytes()
    with pytest.raises(TypeError):
        write_results(tmp_path, {"status": "completed", "config": {}, "rounds": [object()]})
    assert (tmp_path / "results.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_the_rename_is_atomic_on_this_file_system(tmp_path):
    # os.replace is the POSIX rename: readers see the old inode or the new one, never a mix
    write_results(tmp_path, {"status": "running", "config": {}, "rounds": []})
    old_inode = os.stat(tmp_path / "results.json").st_ino
    write_results(tmp_path, {"status": "completed", "config": {}, "rounds": []})
    assert os.stat(tmp_path / "results.json").st_ino != old_inode


def test_the_run_folder_object_names_every_file_of_a_run(tmp_path):
    from fedpeft.rundir import RunDir

    run = RunDir(tmp_path / "run")
    assert run.results == tmp_path / "run" / "results.json"
    assert (run.checkpoint_meta.name, run.checkpoint_arrays.name) == ("checkpoint.json", "checkpoint.npz")
    assert (run.adapter.name, run.figure.name, run.sweep.name) == ("adapter", "accuracy.png", "sweep.json")
    write_results(run.path, {"status": "completed", "config": {}, "rounds": []})
    assert RunDir.results_of(run.path) == run.results == RunDir.results_of(run.results)
    assert RunDir.find_results(tmp_path) == [run.results]
