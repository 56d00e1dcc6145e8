"""``-o`` rules: atomic onto a regular file or a new path, written through onto a device or FIFO,
a symlink's target written, modes kept, input files and odd paths refused before any work."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from regfx.cli import main
from regfx.errors import OutputError

from .runner import run_main

MLP = ("from torch import nn\n"
       "def build_model():\n"
       "    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))\n")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.py"
    path.write_text(MLP)
    return path


def listing(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry of ``folder``: its mode and, for regular files, its bytes."""
    out = {}
    for p in sorted(folder.iterdir()):
        st = os.lstat(p)
        out[p.name] = (st.st_mode, p.read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return out


def test_existing_file_keeps_its_mode(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = model.parent / "report.json"
    out.write_text("old")
    out.chmod(0o644)
    code, _, err = run_main(["audit", str(model), "--format", "json", "-o", str(out)], capsys)
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    json.loads(out.read_text())


def test_new_file_gets_the_umask_default(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = model.parent / "new.json"
    old = os.umask(0o022)
    try:
        code, _, err = run_main(["audit", str(model), "--format", "json", "-o", str(out)], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_symlink_writes_its_target(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = model.parent / "real.json"
    target.write_text("old")
    link = model.parent / "link.json"
    link.symlink_to(target.name)
    code, _, err = run_main(["audit", str(model), "--format", "json", "-o", str(link)], capsys)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == "real.json"
    assert json.loads(target.read_text())["model"] == "Sequential"


def test_character_device_is_written_through(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        node = Path("/dev/null")  # a device a non-root user may write but never replace
    else:
        node = model.parent / "null"
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
    before = os.stat(node)
    code, _, err = run_main(["audit", str(model), "--format", "json", "-o", str(node)], capsys)
    assert code == 0, err
    after = os.stat(node)
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino


def test_fifo_is_written_through(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = model.parent / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, _, err = run_main(["audit", str(model), "--format", "json", "-o", str(fifo)], capsys)
    reader.join(30)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert json.loads(received[0])["model"] == "Sequential"


@pytest.mark.parametrize("which", ["model", "recipe", "policy", "baseline", "pyproject"])
def test_an_input_file_is_never_an_output(model: Path, which: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = model.parent
    (folder / "recipe.toml").write_text("dropout = 0.1\n")
    (folder / "policy.toml").write_text('fail_on = "error"\n')
    (folder / "pyproject.toml").write_text("[tool.regfx]\ndropout = 0.1\n")
    run_main(["audit", str(model), "--format", "json", "-o", str(folder / "base.json")], capsys)
    argv = {
        "model": ["audit", str(model), "-o", str(model)],
        "recipe": ["apply", str(model), "--recipe", str(folder / "recipe.toml"),
                   "-o", str(folder / "recipe.toml")],
        "policy": ["audit", str(model), "--policy", str(folder / "policy.toml"),
                   "-o", str(folder / "policy.toml")],
        "baseline": ["audit", str(model), "--baseline", str(folder / "base.json"),
                     "-o", str(folder / "base.json")],
        "pyproject": ["audit", str(model), "-o", str(folder / "pyproject.toml")],
    }[which]
    before = listing(folder)
    code, out, err = run_main(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "is an input of this command" in err and out == ""
    assert listing(folder) == before


def test_an_input_reached_through_a_symlink_is_refused(model: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    link = model.parent / "alias.py"
    link.symlink_to(model.name)
    before = listing(model.parent)
    code, _, err = run_main(["audit", str(model), "-o", str(link)], capsys)
    assert code == 2 and "is an input of this command" in err
    assert listing(model.parent) == before


@pytest.mark.parametrize(("path", "needle"), [
    ("", "the -o path is empty"),
    ("{d}/newdir/", "ends with a path separator"),
    ("{d}/", "is a directory"),
])
@pytest.mark.parametrize("command", ["audit", "apply", "show", "rules"])
def test_odd_paths_are_refused(model: Path, path: str, needle: str, command: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = {"audit": ["audit", str(model)], "apply": ["apply", str(model), "--dropout", "0.1"],
            "show": ["show", str(model)], "rules": ["rules"]}[command]
    before = listing(model.parent)
    code, out, err = run_main([*argv, "-o", path.format(d=model.parent)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and needle in err and out == ""
    assert listing(model.parent) == before


def test_write_atomic_refuses_a_folder(tmp_path: Path) -> None:
    from regfx.cli import write_atomic

    with pytest.raises(OutputError, match="is a directory"):
        write_atomic(tmp_path, "x")
    assert list(tmp_path.iterdir()) == []


def test_main_writes_nothing_when_the_model_fails(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def build_model():\n    raise SystemExit(3)\n")
    out = tmp_path / "report.json"
    out.write_text("keep")
    with pytest.raises(SystemExit) as info:
        main(["audit", str(bad), "-o", str(out)])
    assert info.value.code == 2
    assert out.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.py", "report.json"]
