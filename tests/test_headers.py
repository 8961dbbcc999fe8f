"""Generated headers name the spec and the regenerate command relative to the repository root (the
git work tree holding the spec) or, outside one, to the spec's folder: never to the working
directory, so a package's bytes do not depend on where ``moec build`` ran or how ``-o`` was spelt.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moec.codegen import build_files, header_root

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "specs" / "examples" / "hetero_small.yaml"


def test_headers_do_not_depend_on_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    _, _, want = build_files("specs/examples/hetero_small.yaml", "generated/hetero_small")
    assert (
        "# regenerate: moec build specs/examples/hetero_small.yaml -o generated/hetero_small\n"
        in (want["layer.py"].decode())
    )
    for cwd, spec, out in [
        (ROOT / "specs", "examples/hetero_small.yaml", "../generated/hetero_small"),
        (tmp_path, EXAMPLE, ROOT / "generated" / "hetero_small"),
    ]:
        monkeypatch.chdir(cwd)
        assert build_files(spec, out)[2] == want, cwd


def test_outside_a_git_work_tree_paths_are_relative_to_the_spec(monkeypatch, tmp_path):
    project = tmp_path / "project"
    (project / "specs").mkdir(parents=True)
    shutil.copy(EXAMPLE, project / "specs" / "small.yaml")
    assert header_root(project / "specs" / "small.yaml") == (project / "specs").resolve()
    builds = []
    for cwd in (tmp_path, project, project / "specs"):
        monkeypatch.chdir(cwd)
        out = project / "generated" / "small"
        builds.append(build_files(project / "specs" / "small.yaml", out)[2])
    assert builds[0] == builds[1] == builds[2]
    assert b"# regenerate: moec build small.yaml -o ../generated/small\n" in builds[0]["layer.py"]
    (project / ".git").mkdir()  # now a work tree: paths from its root
    assert header_root(project / "specs" / "small.yaml") == project.resolve()
    monkeypatch.chdir(tmp_path)
    files = build_files(project / "specs" / "small.yaml", project / "generated" / "small")[2]
    assert b"# regenerate: moec build specs/small.yaml -o generated/small\n" in files["layer.py"]
