"""The writer on an unfriendly disk: outputs the operating system refuses, symlinks, modes, killed
and concurrent builds. Each case runs ``moec`` as a user would and checks the exit code, the one-line
message, and that nothing half-written is left behind."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moec.cli import main
from moec.codegen import writer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "specs" / "examples" / "hetero_small.yaml"
HF_CONFIG = ROOT / "tests" / "data" / "hf_configs" / "mixtral_8x7b.json"


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE, tmp_path / "spec.yaml")
    return "spec.yaml"


def hidden(folder: Path | str = ".") -> list[str]:
    """What a build may leave beside a package: staging and retired trees, lock and temp files."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def one_error(err: str) -> str:
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def change(spec: str) -> None:
    Path(spec).write_text(Path(spec).read_text().replace("top_k: 4", "top_k: 3"))


@pytest.mark.parametrize(
    "output, message",
    [
        ("afile/pkg", "cannot write afile/pkg: {tmp}/afile is not a directory"),
        ("afile", "cannot write afile: it is a file, not a package directory"),
        (".", "cannot write .: it is the working directory or holds it"),
        ("sub/..", "cannot write sub/..: it is the working directory or holds it"),
    ],
)
def test_output_the_os_refuses_is_a_usage_error(spec, tmp_path, capsys, output, message):
    Path("afile").write_text("not a folder")
    Path("sub").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["build", spec, "-o", output]) == 2
    assert message.format(tmp=tmp_path) in one_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert Path("afile").read_text() == "not a folder"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_under_proc(spec, capsys):
    assert main(["build", spec, "-o", "/proc/pkg"]) == 2
    assert "cannot write /proc/pkg: " in one_error(capsys.readouterr().err)
    assert main(["import-hf", str(HF_CONFIG), "-o", "/proc/x.yaml"]) == 2
    assert "cannot write /proc/x.yaml: " in one_error(capsys.readouterr().err)


def test_permission_denied_names_the_path(spec, monkeypatch, capsys):
    """A folder the user may not write (simulated: the tests may run as root, who may write anywhere)."""
    Path("ro").mkdir()
    locked = str(Path("ro").resolve())

    def refuse(real):
        def call(path, *args, **kwargs):
            inside = isinstance(path, (str, os.PathLike)) and str(Path(path).resolve()).startswith(
                locked + os.sep
            )
            if inside:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        return call

    for module, name in ((os, "mkdir"), (os, "open"), (io, "open")):
        monkeypatch.setattr(module, name, refuse(getattr(module, name)))
    assert main(["build", spec, "-o", "ro/pkg"]) == 2
    assert one_error(capsys.readouterr().err) == "error: cannot write ro/pkg: Permission denied\n"
    assert main(["import-hf", str(HF_CONFIG), "-o", "ro/m.yaml"]) == 2
    assert (
        one_error(capsys.readouterr().err) == "error: cannot write ro/m.yaml: Permission denied\n"
    )
    assert list(Path("ro").iterdir()) == []


def test_import_hf_onto_a_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("existing_dir").mkdir()
    assert main(["import-hf", str(HF_CONFIG), "-o", "existing_dir"]) == 2
    assert "cannot write existing_dir: it is a directory" in one_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_dir"]
    assert main(["import-hf", str(HF_CONFIG), "-o", "spec.yaml"]) == 0
    assert Path("spec.yaml").read_text().startswith("#") and hidden() == []


def test_symlinked_output_builds_into_its_target(spec):
    Path("real").mkdir()
    os.symlink("real", "link")
    assert main(["build", spec, "-o", "link"]) == 0
    change(spec)
    assert main(["build", spec, "-o", "link"]) == 0
    assert Path("link").is_symlink() and os.readlink("link") == "real"
    assert "TOP_K = 3" in Path("real/router.py").read_text()
    assert writer.read_manifest(Path("real")) and hidden() == []


def test_user_symlinks_in_the_package_stay_symlinks(spec):
    assert main(["build", spec, "-o", "out"]) == 0
    Path("notes.txt").write_text("mine")
    Path("data").mkdir()
    Path("data/big.bin").write_bytes(b"\0" * 10)
    os.symlink("../notes.txt", "out/notes.txt")
    os.symlink(str(Path("data").resolve()), "out/data")
    change(spec)
    assert main(["build", spec, "-o", "out"]) == 0
    assert os.readlink("out/notes.txt") == "../notes.txt"
    assert os.readlink("out/data") == str(Path("data").resolve())
    assert Path("notes.txt").read_text() == "mine" and hidden() == []


def test_a_symlink_where_a_generated_file_goes_is_not_written_through(spec, capsys):
    assert main(["build", spec, "-o", "out"]) == 0
    outside = Path("outside.py")
    outside.write_bytes(Path("out/router.py").read_bytes())
    Path("out/router.py").unlink()
    os.symlink("../outside.py", "out/router.py")
    change(spec)
    assert main(["build", spec, "-o", "out"]) == 2
    assert "out/router.py: is a symlink" in capsys.readouterr().err
    assert main(["build", spec, "-o", "out", "--force"]) == 0
    assert not Path("out/router.py").is_symlink()
    assert "TOP_K = 3" in Path("out/router.py").read_text()
    assert "TOP_K = 4" in outside.read_text(), "the link's target must not be written"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_a_new_package_gets_the_umask_mode(spec, umask, mode):
    old = os.umask(umask)
    try:
        assert main(["build", spec, "-o", "deep/out"]) == 0
    finally:
        os.umask(old)
    for folder in ("deep", "deep/out", "deep/out/launch"):
        assert Path(folder).stat().st_mode & 0o777 == mode, folder
    assert Path("deep/out/layer.py").stat().st_mode & 0o777 == mode & 0o666
    assert Path("deep/out/launch/torchrun.sh").stat().st_mode & 0o777 == mode


# A build that dies (SIGKILL) halfway through writing its new tree, or between the swap's two
# renames; or ("slow") dawdles there for a second, so that concurrent builds meet in the swap.
BUILD = """
import os, signal, sys, time
from pathlib import Path
from moec.cli import main

when = sys.argv[1]
real_rename, real_write = os.rename, Path.write_bytes
writes = []

def rename(src, dst):
    real_rename(src, dst)
    if "old" in Path(dst).name:  # the package was just renamed away
        if when == "swap":
            os.kill(os.getpid(), signal.SIGKILL)
        if when == "slow":
            time.sleep(1.0)

def write_bytes(self, data):
    writes.append(self)
    if when == "staging" and len(writes) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(self, data)

os.rename, Path.write_bytes = rename, write_bytes
sys.exit(main(["build", "spec.yaml", "-o", "out"]))
"""


def build_process(when: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", BUILD, when], env=env, stderr=subprocess.PIPE)


def killed_build(when: str) -> None:
    proc = build_process(when)
    err = proc.communicate()[1].decode()
    assert proc.returncode == -9, err


@pytest.mark.parametrize("when", ["staging", "swap"])
def test_the_build_after_a_killed_one_cleans_up(spec, when, capsys):
    assert main(["build", spec, "-o", "out"]) == 0
    before = writer.read_manifest(Path("out"))
    change(spec)
    killed_build(when)
    if when == "swap":  # the package is gone; its old copy is kept
        assert not Path("out").exists() and ".out.moec-old" in hidden()
    else:
        assert writer.read_manifest(Path("out")) == before and ".out.moec-new" in hidden()
    assert main(["build", spec, "-o", "out"]) == 0
    assert "TOP_K = 3" in Path("out/router.py").read_text() and hidden() == []
    assert writer.read_manifest(Path("out")) != before


def test_leftovers_of_earlier_moec_versions_are_removed(spec):
    assert main(["build", spec, "-o", "out"]) == 0
    for name in (".out.new-ab12cd34", ".out.old-x_9y8z7w", ".out.moec-new"):
        Path(name).mkdir()
        Path(name, "layer.py").write_text("half")
    Path(".outer.new-ab12cd34").mkdir()  # another package's: not ours to remove
    assert main(["build", spec, "-o", "out"]) == 0
    assert hidden() == [".outer.new-ab12cd34"]


def test_a_build_waits_for_another_then_gives_up_clearly(spec, monkeypatch, capsys):
    monkeypatch.setattr(writer, "LOCK_WAIT_S", 0.3)
    with writer._locked(Path("out").resolve()):
        assert main(["build", spec, "-o", "out"]) == 2
    err = one_error(capsys.readouterr().err)
    assert "cannot write out: another moec build has held" in err and ".out.lock" in err
    assert not Path("out").exists() and hidden() == []


def test_a_build_waits_while_another_holds_the_lock(spec):
    lock = writer._locked(Path("out").resolve())
    lock.__enter__()
    threading.Timer(0.5, lock.__exit__, (None, None, None)).start()
    assert main(["build", spec, "-o", "out"]) == 0
    assert writer.read_manifest(Path("out")) and hidden() == []


def test_concurrent_builds_of_one_package(spec):
    """Each build sleeps between its swap's renames: without the lock, the next one to swap finds
    no package to rename (an internal error), or retires the one just written."""
    assert main(["build", spec, "-o", "out"]) == 0
    change(spec)
    procs = [build_process("slow") for _ in range(3)]
    errs = [proc.communicate()[1].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], errs
    manifest = writer.read_manifest(Path("out"))
    files = {str(p.relative_to("out")) for p in Path("out").rglob("*") if p.is_file()}
    assert set(manifest) == files - {"MANIFEST"} and hidden() == []
    assert "TOP_K = 3" in Path("out/router.py").read_text()
    assert json.loads(Path("out/plan.json").read_text())["name"] == "hetero_small"
