"""The command line's contract: several specs build all or nothing, check rejects what build
rejects, --check says what a build would do, and --help documents it all."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moec.cli import main, parser

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "specs" / "examples" / "hetero_small.yaml"


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE, tmp_path / "spec.yaml")
    return "spec.yaml"


def variant(name: str, old: str = "", new: str = "", rename: str | None = None) -> str:
    """A copy of the example spec with ``old`` replaced by ``new`` (and its name changed)."""
    text = EXAMPLE.read_text().replace(old, new) if old else EXAMPLE.read_text()
    if rename:
        text = text.replace("name: hetero_small", f"name: {rename}")
    Path(name).write_text(text)
    return name


def test_several_specs_are_all_validated_before_any_is_written(spec, capsys):
    good2 = variant("good2.yaml", rename="other")
    bad = variant("bad.yaml", "top_k: 4", "top_k: 99", rename="bad")
    bad2 = variant("bad2.yaml", "hidden: 256", "hidden: -1", rename="bad2")
    assert main(["build", spec, bad, good2, bad2, "--out-dir", "out"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:14:3: error: router.top_k" in err and "bad2.yaml:5:1: error: hidden" in err
    assert "spec.yaml" not in err and "good2.yaml" not in err
    assert err.endswith("error: 2 of 4 specs have errors: nothing written\n")
    assert not Path("out").exists()
    assert main(["build", spec, good2, "--out-dir", "out"]) == 0
    assert sorted(p.name for p in Path("out").iterdir()) == ["hetero_small", "other"]


def test_two_specs_with_one_name_are_refused(spec, capsys):
    copy = variant("copy.yaml", "top_k: 4", "top_k: 3")
    assert main(["build", spec, copy, "--out-dir", "out"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: spec.yaml and copy.yaml would both write out/hetero_small (name: hetero_small): "
        "nothing written; give the specs different names\n"
    )
    assert not Path("out").exists()


@pytest.mark.parametrize(
    "line, field",
    [
        ("placement: {trace: nonexistent.json}", "placement.trace: nonexistent.json: cannot read"),
        ("kernels: {tuning: missing.json}", "kernels.tuning: missing.json: cannot read"),
    ],
)
@pytest.mark.parametrize("command", ["check", "plan", "build"])
def test_check_rejects_what_plan_and_build_reject(spec, capsys, command, line, field):
    Path(spec).write_text(Path(spec).read_text() + line + "\n")
    assert main([command, spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spec.yaml:21:") and f": error: {field}" in err, err
    assert err.count("error:") == 1 and not Path("generated").exists()


def test_a_named_gpu_that_is_too_small_names_cluster_gpu(spec, capsys):
    text = Path(spec).read_text().replace("hidden: 256", "hidden: 16384")
    Path(spec).write_text(text.replace("ffn: 512", "ffn: 65536") + "cluster: {gpu: a100}\n")
    assert main(["check", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spec.yaml:21:11: error: cluster.gpu: experts need ")
    assert "a100: 80 GB per GPU" in err


def test_check_says_what_a_build_would_do(spec, capsys):
    assert main(["build", spec, "-o", "out"]) == 0
    n = sum(p.is_file() for p in Path("out").rglob("*"))  # the package's files, MANIFEST included
    assert capsys.readouterr().err.startswith(
        f"hetero_small -> out: {n} files written, 0 unchanged"
    )
    assert main(["build", spec, "-o", "out", "--check"]) == 0
    assert capsys.readouterr().err == ""

    layer = Path("out/layer.py")
    layer.write_text(layer.read_text() + "# my edit\n")
    assert main(["build", spec, "-o", "out", "--check"]) == 1
    assert capsys.readouterr().err == (
        "would refuse to overwrite:\n"
        "  out/layer.py: edited by hand since it was generated\n"
        "  hint: move your edits into the spec, or pass --force to overwrite\n"
    )
    assert main(["build", spec, "-o", "out", "--check", "--force"]) == 1
    assert (
        capsys.readouterr().err
        == f"out: would overwrite hand-edited layer.py ({n - 1} unchanged)\n"
    )
    assert main(["build", spec, "-o", "out", "--force"]) == 0
    assert f"1 file written, {n - 1} unchanged" in capsys.readouterr().err

    Path(spec).write_text(Path(spec).read_text().replace("top_k: 4", "top_k: 3"))
    assert main(["build", spec, "-o", "out", "--check"]) == 1
    assert capsys.readouterr().err == f"out: would write {n} files (0 unchanged)\n"


def test_check_passes_with_only_stale_files_unless_pruning(spec, capsys):
    assert main(["build", spec, "-o", "out"]) == 0
    text = Path(spec).read_text().replace("dtype: int8", "dtype: bf16")
    Path(spec).write_text(text.replace("dtype: int4", "dtype: bf16"))
    assert main(["build", spec, "-o", "out"]) == 0
    capsys.readouterr()
    assert main(["build", spec, "-o", "out", "--check"]) == 0
    assert (
        capsys.readouterr().err
        == "out: no longer generated, kept (--prune removes them): quant.py\n"
    )
    assert main(["build", spec, "-o", "out", "--check", "--prune"]) == 1
    assert "out: would write 1 file, remove 1 file" in capsys.readouterr().err


def subcommands() -> dict:
    action = next(a for a in parser()._actions if a.dest == "command")
    return action.choices


def test_help_documents_commands_arguments_defaults_and_exit_codes(capsys):
    top = parser().format_help()
    for code in ("0    ok", "1    build --check", "2    a bad spec", "123  an internal error"):
        assert code in top
    for name, sub in subcommands().items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"moec {name} {action.dest} has no help"
    help_of = {name: " ".join(sub.format_help().split()) for name, sub in subcommands().items()}
    assert "random tokens when no --inputs (default: 4096)" in help_of["trace"]
    assert "(default: 16,256,4096,16384)" in help_of["tune"]
    assert "0-based" in help_of["import-hf"]
    assert "nothing is written" in help_of["build"]


def test_the_readme_spec_example_is_a_valid_spec(tmp_path, capsys):
    """The README's annotated spec (every field with its comment) validates and plans: a field
    renamed in the schema, or a value the README shows that validation refuses, fails here."""
    block = (ROOT / "README.md").read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "name: mixtral_8x7b" in block and "dtype: fp32" in block
    (tmp_path / "readme.yaml").write_text(block)
    assert main(["check", str(tmp_path / "readme.yaml")]) == 0, capsys.readouterr().err
