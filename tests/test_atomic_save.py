"""Saves replace a folder as a unit: a failure at any step, or a kill, leaves the old or the new adapter."""
import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import cuma_model
from cuma_model import atomic
from tiny_models import randomize_experts, tiny_decoder

HERE = os.path.dirname(os.path.abspath(__file__))


def adapter(seed: int, **kw):
    model = tiny_decoder("llama")
    cuma_model.patch_model(model, **{"num_experts": 4, "top_k": 2, "r": 4, "demographic_dim": 5, **kw})
    randomize_experts(model, seed=seed)
    return model


def outputs(model):
    ids, z = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0)), torch.ones(2, 5)
    return model(ids, demographic_embeds=z).logits


def hidden_entries(folder):
    return [p.name for p in pathlib.Path(folder).iterdir() if p.name.startswith(".")]


class Faults:
    """Raise OSError at the n-th call of any primitive a folder replacement uses."""

    PRIMITIVES = [(tempfile, "mkdtemp"), (pathlib.Path, "write_bytes"), (pathlib.Path, "write_text"),
                  (os, "fsync"), (os, "rename"), (os, "link"), (shutil, "rmtree"), (atomic, "_exchange")]

    def __init__(self, monkeypatch, n: int):
        self.n, self.calls = n, 0
        for owner, name in self.PRIMITIVES:
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name), name))

    def wrap(self, fn, name):
        def faulty(*a, **k):
            self.calls += 1
            if self.calls == self.n:
                if k.get("ignore_errors"):
                    return None  # rmtree(ignore_errors=True) swallows its failures
                raise OSError(errno.EIO, f"injected failure in {name}")
            return fn(*a, **k)
        return faulty


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_failure_at_any_step_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, exchange):
    if not exchange:  # a file system without an atomic exchange
        def no_exchange(a, b):
            raise OSError(errno.ENOSYS, "no renameat2")
        monkeypatch.setattr(atomic, "_exchange", no_exchange)
    old, new = adapter(seed=1, lora_alpha=16), adapter(seed=2, lora_alpha=64)  # same shapes, other alpha
    folder = tmp_path / "adapter"
    expected = {"old": outputs(old), "new": outputs(new)}
    seen, n = set(), 1
    while True:
        cuma_model.save_pretrained(old, folder)
        (folder / "tokenizer.json").write_text("{}")  # a file of the user's that shares the folder
        with monkeypatch.context() as m:
            faults = Faults(m, n)
            try:
                cuma_model.save_pretrained(new, folder)
                failed = False
            except OSError as e:
                assert "injected" in str(e)
                failed = True
        loaded = cuma_model.from_pretrained(tiny_decoder("llama"), folder)  # repairs an interrupted swap
        got = [k for k, v in expected.items() if torch.equal(outputs(loaded), v)]
        assert len(got) == 1, f"failure at call {n}: the folder holds neither the old nor the new adapter"
        assert loaded.cuma.config.lora_alpha == (16 if got[0] == "old" else 64)  # weights and config together
        assert (folder / "tokenizer.json").read_text() == "{}"
        seen.add(got[0])
        if faults.calls < n:  # every step has had its failure
            assert not failed
            break
        n += 1
    assert seen == {"old", "new"} and n > 8  # failures before and after the swap were both exercised
    cuma_model.save_pretrained(new, folder)
    assert hidden_entries(tmp_path) == [] and hidden_entries(folder) == []  # leftovers cleaned by the next save


def test_the_empty_name_of_an_interrupted_swap_is_repaired(tmp_path):
    """The gap of the two-rename fallback: the old folder moved aside, the new one not yet in place."""
    old = adapter(seed=1)
    folder = tmp_path / "final"
    cuma_model.save_pretrained(old, folder)
    os.rename(folder, tmp_path / ".final.cuma-old-abc123")
    os.mkdir(tmp_path / ".final.cuma-tmp-def456")
    loaded = cuma_model.from_pretrained(tiny_decoder("llama"), folder)
    torch.testing.assert_close(outputs(loaded), outputs(old), rtol=0, atol=0)
    # a load never deletes a hidden folder: it may be another process's save in progress; the next save does
    assert sorted(p.name for p in tmp_path.iterdir()) == [".final.cuma-tmp-def456", "final"]
    cuma_model.save_pretrained(old, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_save_is_durable(tmp_path, monkeypatch):
    synced = []
    real = atomic.fsync_path
    monkeypatch.setattr(atomic, "fsync_path", lambda p: (synced.append(os.path.abspath(p)), real(p))[1])
    cuma_model.save_pretrained(adapter(seed=1), tmp_path / "a")
    cuma_model.save_pretrained(adapter(seed=2), tmp_path / "a")
    assert str(tmp_path) in synced  # the parent, after the rename
    assert any(p.endswith("adapter_model.safetensors") for p in synced)


def test_killed_mid_save_leaves_a_complete_adapter(tmp_path):
    folder = tmp_path / "adapter"
    for delay in (0.1, 0.6):
        child = subprocess.Popen([sys.executable, os.path.join(HERE, "save_worker.py"), str(folder)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "saving"
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        loaded = cuma_model.from_pretrained(tiny_decoder("llama"), folder)
        B = cuma_model.cuma_layers(loaded)["model.layers.0.self_attn.q_proj"].cuma_B
        value = float(B.detach().flatten()[0])
        assert value >= 1 and torch.equal(B, torch.full_like(B, value)), "a save mixed two versions"
        for layer in cuma_model.cuma_layers(loaded).values():
            assert torch.equal(layer.cuma_B, torch.full_like(layer.cuma_B, value))
    assert not hidden_entries(folder)
    cuma_model.save_pretrained(adapter(seed=3, lora_alpha=2.0), folder)
    assert hidden_entries(tmp_path) == []


def test_saving_over_another_adapter_needs_overwrite(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_dir = tmp_path / "peft"
    get_peft_model(tiny_decoder("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(peft_dir))
    with pytest.raises(FileExistsError, match="LORA adapter.*overwrite=True"):
        cuma_model.save_pretrained(adapter(seed=1), peft_dir)
    cuma_dir = tmp_path / "cuma"
    cuma_model.save_pretrained(adapter(seed=1, r=2), cuma_dir)
    with pytest.raises(FileExistsError, match="another layout"):
        cuma_model.save_pretrained(adapter(seed=1), cuma_dir)
    model = adapter(seed=2)
    cuma_model.save_pretrained(model, cuma_dir, overwrite=True)
    cuma_model.save_pretrained(model, cuma_dir)  # the same layout again: an update, no question asked
    cuma_model.save_pretrained(model, peft_dir, overwrite=True)
    torch.testing.assert_close(outputs(cuma_model.from_pretrained(tiny_decoder("llama"), peft_dir)), outputs(model))
    assert (peft_dir / "README.md").is_file()  # PEFT's model card is not the adapter's: it stays


def test_odd_names_symlinks_and_permissions(tmp_path):
    old, new = adapter(seed=1), adapter(seed=2)
    folder = tmp_path / "run[1]"  # glob characters in the name
    cuma_model.save_pretrained(old, folder)
    os.rename(folder, tmp_path / ".run[1].cuma-old-abc123")
    torch.testing.assert_close(outputs(cuma_model.from_pretrained(tiny_decoder("llama"), folder)), outputs(old))
    real, link = tmp_path / "real", tmp_path / "link"
    cuma_model.save_pretrained(old, real)
    os.chmod(real, 0o755)
    link.symlink_to(real)
    cuma_model.save_pretrained(new, link)  # the folder the link names is replaced; the link stays a link
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    torch.testing.assert_close(outputs(cuma_model.from_pretrained(tiny_decoder("llama"), real)), outputs(new))
    assert oct(real.stat().st_mode & 0o777) == "0o755"  # the folder keeps its permissions
    assert hidden_entries(tmp_path) == []


def test_a_users_hidden_and_tmp_files_survive_saves(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    mine = {".notes.tmp": "notes", ".adapter_config.json.mine.tmp": "a backup", "notes.tmp": "more"}
    for name, text in mine.items():
        (folder / name).write_text(text)
    (folder / ".adapter_config.json.cuma-part-x1y2z3").write_text("{")  # a partial write of ours, killed
    cuma_model.save_pretrained(adapter(seed=1), folder)
    cuma_model.save_pretrained(adapter(seed=2), folder)
    assert {n: (folder / n).read_text() for n in mine} == mine
    assert not (folder / ".adapter_config.json.cuma-part-x1y2z3").exists()
    # single files: a user's `.<name>.*.tmp` stays, the partial file of a killed write goes
    (tmp_path / ".metrics.json.old.tmp").write_text("kept")
    (tmp_path / ".metrics.json.cuma-part-abc123").write_text("partial")
    atomic.atomic_write_bytes(tmp_path / "metrics.json", b"{}")
    assert (tmp_path / ".metrics.json.old.tmp").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".metrics.json.old.tmp", "adapter", "metrics.json"]


FIFO_CHILD = """
import os, sys, json
sys.path[:0] = [{here!r}, os.path.dirname({here!r})]
import cuma_model
from tiny_models import tiny_decoder
model = tiny_decoder("llama")
cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=5)
try:
    cuma_model.save_pretrained(model, sys.argv[1])
    print(json.dumps("saved"))
except Exception as e:
    print(json.dumps(type(e).__name__ + ": " + str(e)))
"""


def save_in_child(folder, timeout=120):
    """save_pretrained(folder) in a child process: a save that blocks fails the test instead of hanging it."""
    code = FIFO_CHILD.format(here=HERE)
    try:
        done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the save into {folder} blocked for {timeout}s")
    assert done.returncode == 0, done.stderr
    return __import__("json").loads(done.stdout.strip().splitlines()[-1])


def test_a_fifo_in_the_folder_never_blocks_a_save(tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        os.mkfifo(folder / name)
        outcome = save_in_child(folder)
        assert outcome.startswith("FileExistsError") and str(folder / name) in outcome and "FIFO" in outcome, outcome
        assert stat_kind(folder / name) == "fifo"  # refused: nothing replaced
        with pytest.raises(FileExistsError, match="FIFO"):  # the unchecked writer of a folder being assembled
            cuma_model.checkpoint.write_adapter(adapter(seed=1), folder)
    # a FIFO of the user's among the files carried into the new folder, at the top and in a subfolder
    folder = tmp_path / "carried"
    cuma_model.save_pretrained(adapter(seed=1), folder)
    (folder / "logs").mkdir()
    os.mkfifo(folder / "pipe")
    os.mkfifo(folder / "logs" / "pipe")
    assert save_in_child(folder) == "saved"
    assert stat_kind(folder / "pipe") == stat_kind(folder / "logs" / "pipe") == "fifo"
    cuma_model.from_pretrained(tiny_decoder("llama"), folder)


def stat_kind(path):
    import stat

    return "fifo" if stat.S_ISFIFO(os.lstat(path).st_mode) else "other"


def test_saving_into_the_working_folder_or_a_folder_that_holds_it_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    cuma_model.save_pretrained(adapter(seed=1), folder)
    (folder / "sub").mkdir()
    before = sorted(os.listdir(folder))
    for cwd, target in [(folder, "."), (folder, folder), (folder / "sub", ".."), (folder / "sub", folder)]:
        monkeypatch.chdir(cwd)
        with pytest.raises(OSError, match="working folder.*save into a subfolder"):
            cuma_model.save_pretrained(adapter(seed=2), target)
        assert os.getcwd() == str(cwd) and os.path.isdir(os.getcwd())
    assert sorted(os.listdir(folder)) == before
    monkeypatch.chdir(folder)
    cuma_model.save_pretrained(adapter(seed=2), "inner")  # a subfolder of the working folder is fine
    torch.testing.assert_close(outputs(cuma_model.from_pretrained(tiny_decoder("llama"), "inner")),
                               outputs(adapter(seed=2)))


def test_a_mount_point_or_a_symlink_loop_is_refused_clearly(tmp_path, monkeypatch):
    outcome = save_in_child("/proc")  # in a child: a regression would read all of /proc, which can block
    assert outcome.startswith("OSError") and "/proc: it is a mount point" in outcome, outcome
    assert "save into a subfolder of it" in outcome and not os.path.exists("/.proc.cuma-lock")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(OSError, match="symlink loop"):
        cuma_model.save_pretrained(adapter(seed=1), tmp_path / "a")
    # a bind mount on the same device passes os.path.ismount: the rename's EBUSY is explained the same way
    folder = tmp_path / "adapter"
    cuma_model.save_pretrained(adapter(seed=1), folder)

    def busy(a, b):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(atomic, "_exchange", busy)
    with pytest.raises(OSError, match="mount point.*save into a subfolder"):
        cuma_model.save_pretrained(adapter(seed=2), folder)
    torch.testing.assert_close(outputs(cuma_model.from_pretrained(tiny_decoder("llama"), folder)),
                               outputs(adapter(seed=1)))


def test_concurrent_saves_into_one_folder_take_turns(tmp_path):
    folder, saves = tmp_path / "adapter", 25
    children = [subprocess.Popen([sys.executable, os.path.join(HERE, "save_worker.py"), str(folder), str(saves)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = []
    for child in children:
        try:
            _, err = child.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
        if child.returncode != 0:
            errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}")
    assert not errors, errors  # every save of every process succeeded
    loaded = cuma_model.from_pretrained(tiny_decoder("llama"), folder)
    for layer in cuma_model.cuma_layers(loaded).values():  # one complete save, not a mix
        assert torch.equal(layer.cuma_B, torch.full_like(layer.cuma_B, float(saves)))
    assert hidden_entries(tmp_path) == [] and hidden_entries(folder) == []  # the lock file went with its holder
