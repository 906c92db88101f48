"""flax_resnet/checkpoint.py: damage versus read errors that may pass, and a full disk.

(Exact resume, damaged checkpoints set aside and preemption, end to end, are test_checkpointing.py's.)
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from flax_resnet import checkpoint, checkpoint_checks, checkpoint_files
from flax_resnet.checkpoint import Checkpointer, CheckpointReadError, DiskFullError
from helpers import run_cli, saved_steps, snapshot, train_argv


def _tiny(tmp_path, steps=(2, 4)):
    state = {"w": jnp.arange(4.0)}
    with Checkpointer(tmp_path, async_save=False) as ck:
        for s in steps:
            ck.save(s, state, {}, {"model": "x"}, force=True)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied", "state/ocdbt.process_0/d/1a2b"),
    ValueError('PERMISSION_DENIED: Error reading local file "state/ocdbt.process_0/manifest.ocdbt"'),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "state/_sharding"),
    MemoryError(),
])
def test_a_read_error_that_may_pass_stops_and_renames_nothing(error, tmp_path, monkeypatch):
    abstract = _tiny(tmp_path)
    before = snapshot(tmp_path)
    ck = Checkpointer(tmp_path)
    original = ck._latest.restore

    def restore(step, args=None):
        if "state" in args.keys():  # the arrays; the JSON items read fine
            raise error
        return original(step, args=args)

    monkeypatch.setattr(ck._latest, "restore", restore)
    with pytest.raises(CheckpointReadError, match=r"could not read checkpoint .*checkpoints/4 .*nothing was changed"):
        ck.resume(abstract)
    ck.close()
    assert snapshot(tmp_path) == before  # the good step 2 was not tried in its place, step 4 not set aside


def test_damage_is_still_set_aside(tmp_path):
    abstract = _tiny(tmp_path)
    (tmp_path / "checkpoints" / "4" / "meta" / "metadata").write_text("{")  # truncated JSON: damage
    warnings = []
    with Checkpointer(tmp_path, warn=warnings.append) as ck:
        assert ck.resume(abstract).step == 2
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir() and "meta/metadata is unreadable" in warnings[0]


def test_an_unreadable_json_item_is_a_read_error_not_damage(tmp_path, monkeypatch):
    _tiny(tmp_path)
    target = tmp_path / "checkpoints" / "4" / "config" / "metadata"
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(self))) if self == target else read_text(self, *a, **k))
    with pytest.raises(CheckpointReadError, match="Permission denied"):
        checkpoint.structural_problem(tmp_path / "checkpoints" / "4")


def test_a_save_failing_for_space_in_the_background_is_one_error(tmp_path, monkeypatch):
    state = {"w": jnp.arange(4.0)}
    ck = Checkpointer(tmp_path)
    ck.save(2, state, {}, {}, force=True)
    ck.wait()

    def full(*a, **k):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "checkpoints/4.orbax-checkpoint-tmp/x": '
                         "Failed to write 24125 bytes to file 23: No space left on device [os_error_code='28']")

    monkeypatch.setattr(ck._latest, "save", full)
    with pytest.raises(DiskFullError, match=r"no space left for a checkpoint in .* resume from step 2, the last"):
        ck.save(4, state, {}, {}, force=True)
    with pytest.raises(DiskFullError):  # every later save or wait says the same, once each
        ck.wait()
    ck.close()
    assert saved_steps(tmp_path) == [2]


def _small_filesystem(path: Path, size_kib: int) -> bool:
    """A tmpfs of ``size_kib`` at ``path`` where this process may mount one (root in a container)."""
    path.mkdir()
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_stops_training_with_one_line_and_keeps_the_checkpoints(digits_run, digits_data_dir,
                                                                             tmp_path, monkeypatch):
    src = digits_run[0]
    used_kib = sum(max(p.stat().st_blocks * 512, 4096) for p in src.rglob("*")) // 1024  # as tmpfs counts
    small = tmp_path / "small"
    mounted = _small_filesystem(small, used_kib + 300)  # the run fits, another checkpoint does not
    try:
        if not mounted:  # a stand-in: the file system reports 100 KiB free
            monkeypatch.setattr(checkpoint_checks, "free_bytes", lambda path: 100 * 1024)
        work = small / "run"
        shutil.copytree(src, work)
        before = snapshot(work / "checkpoints")
        rc, out, err = run_cli(train_argv(work, digits_data_dir, "--config.num_epochs=3"))
        assert rc == 2, err
        lines = [ln for ln in re.split(r"[\r\n]", err) if ln.strip() and not re.match(r"epoch \d+/\d+:", ln)]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"error: no space left for a checkpoint in {work}: it needs about ")
        assert "rerun the same command to resume from step 44" in lines[0]
        assert snapshot(work / "checkpoints") == before  # every good checkpoint as it was
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)


def test_background_saves_write_the_state_as_given_even_once_its_buffers_are_donated(tmp_path, monkeypatch):
    from flax_resnet.training.saving import SaveQueue

    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(7)}
    expected = jax.device_get(state)
    donated = threading.Event()
    with Checkpointer(tmp_path) as ck:
        for name in ("save", "save_best"):  # the worker starts writing only once the loop has moved on
            original = getattr(ck, name)
            monkeypatch.setattr(ck, name, lambda *a, _f=original, **k: (donated.wait(10), _f(*a, **k))[1])
        saves = SaveQueue(ck, background=True)
        saves.save(7, state, {"step": 7}, {"model": "x"}, force=True)
        saves.save_best(7, state, {"step": 7}, {"model": "x"}, {"epoch": 1}, 0.5)
        assert saves.is_saved(7)  # queued
        for leaf in jax.tree.leaves(state):  # what the next train step does to the state it was given
            leaf.delete()
        donated.set()
        assert not saves.is_saved(8)
        saves.wait()
        saves.close()
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in expected.items()}
        for which in ("latest", "best"):
            got = jax.device_get(ck.restore(abstract, which)[0])
            assert all((got[k] == expected[k]).all() for k in expected), which
        assert ck.best_metric() == 0.5


def test_a_background_save_failing_surfaces_on_the_loops_thread(tmp_path, monkeypatch):
    from flax_resnet.training.saving import SaveQueue

    state = {"w": jnp.arange(4.0)}
    ck = Checkpointer(tmp_path)
    saves = SaveQueue(ck, background=True)
    monkeypatch.setattr(ck, "save", lambda *a, **k: (_ for _ in ()).throw(
        DiskFullError("no space left for a checkpoint in X")))
    saves.save(2, state, {}, {}, force=True)
    with pytest.raises(DiskFullError, match="no space left"):
        saves.wait()
    saves.close()
    ck.close()


def test_the_best_of_a_saved_step_is_a_copy_of_it_and_replaces_the_older_best(tmp_path, monkeypatch):
    """One Orbax save per improving epoch: the best is the finished latest step copied, its metrics added."""
    state, better = {"w": jnp.arange(6.0)}, {"w": jnp.arange(6.0) * 2}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ckpts, best = tmp_path / "checkpoints", tmp_path / "checkpoints_best"
    with Checkpointer(tmp_path) as ck:
        monkeypatch.setattr(ck._best, "save", lambda *a, **k: pytest.fail("a second Orbax save"))
        assert ck.save(2, state, {"i": 2}, {"model": "x"}, {"epoch": 1}, force=True)
        assert ck.save_best(2, state, {"i": 2}, {"model": "x"}, {"epoch": 1}, test_top1=0.5)
        copied = snapshot(best / "2")
        assert {k: v for k, v in copied.items() if not k.startswith("metrics/")} == snapshot(ckpts / "2")
        assert ck.save(4, better, {"i": 4}, {"model": "x"}, {"epoch": 2}, force=True)
        assert ck.save_best(4, better, {"i": 4}, {"model": "x"}, {"epoch": 2}, test_top1=0.75)
        assert saved_steps(tmp_path, "checkpoints_best") == [4] and saved_steps(tmp_path) == [2, 4]
        # A copy that fails (the disk filled) leaves the best as it was, and no partial directory.
        assert ck.save(6, state, {"i": 6}, {"model": "x"}, {"epoch": 3}, force=True)
        monkeypatch.setattr(checkpoint_files.shutil, "copy2",
                            lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(DiskFullError, match="no space left for a checkpoint"):
            ck.save_best(6, state, {"i": 6}, {"model": "x"}, {"epoch": 3}, test_top1=0.9)
        assert sorted(p.name for p in best.iterdir()) == ["4"] and ck.best_metric() == 0.75
    with Checkpointer(tmp_path, read_only=True) as ck:
        assert (ck.best_step(), ck.best_metric()) == (4, 0.75)
        assert checkpoint_checks.structural_problem(best / "4", best=True) is None
        restored, data_state, _, meta = ck.restore(abstract, "best")
    assert data_state == {"i": 4} and meta == {"epoch": 2}
    assert jnp.array_equal(restored["w"], better["w"])
    # A step checkpoints/ does not hold is Orbax's own save, which keeps one best too.
    with Checkpointer(tmp_path, async_save=False) as ck:
        assert ck.save_best(9, state, {"i": 9}, {"model": "x"}, {"epoch": 4}, test_top1=0.8)
    assert saved_steps(tmp_path, "checkpoints_best") == [9]


def test_the_state_is_written_without_shardings_and_reads_checkpoints_of_the_standard_handler(tmp_path):
    """No ``_sharding`` file (every restore brings its own); checkpoints Orbax's StandardSave wrote,
    as earlier versions did, resume bit for bit; another model's shapes are still refused."""
    import orbax.checkpoint as ocp
    state = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "step": jnp.asarray(5, jnp.int32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with Checkpointer(tmp_path / "new", async_save=False) as ck:
        ck.save(5, state, {}, {"model": "x"}, force=True)
    state_dir = tmp_path / "new" / "checkpoints" / "5" / "state"
    assert (state_dir / "manifest.ocdbt").is_file() and not (state_dir / "_sharding").exists()
    old = ocp.CheckpointManager(tmp_path / "old" / "checkpoints", item_names=checkpoint.ITEMS)
    old.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}),
                                        config=ocp.args.JsonSave({"model": "x"}), meta=ocp.args.JsonSave({})))
    old.wait_until_finished()
    old.close()
    assert (tmp_path / "old" / "checkpoints" / "5" / "state" / "_sharding").is_file()
    for run in ("new", "old"):
        with Checkpointer(tmp_path / run) as ck:
            restored = ck.resume(abstract)
        assert restored.step == 5 and restored.config == {"model": "x"}
        for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state)):
            assert got.dtype == want.dtype and bool(jnp.all(got == want))
    # One array only: a failed read abandons its siblings' reads, which warn whenever they are collected.
    with Checkpointer(tmp_path / "one", async_save=False) as ck:
        ck.save(5, {"w": state["w"]}, {}, {"model": "x"}, force=True)
        with pytest.raises(checkpoint.UnreadableCheckpointError, match="incompatible model"):
            ck.restore({"w": jax.ShapeDtypeStruct((3, 2), jnp.float32, sharding=state["w"].sharding)}, "latest")
