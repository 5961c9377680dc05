"""Every YAML the package reads goes through one loader that refuses alias bombs, recursive documents and absurd
nesting with one line naming the file (issue 20, case 9); ``model.kwargs`` are checked before a run folder exists."""

import pytest
import yaml

from helpers import error_line
from vesuvius_monai.cli import main
from vesuvius_monai.config import DataConfig, read_yaml_mapping
from vesuvius_monai.config.resolve import MAX_ALIAS_NODES, load_yaml
from vesuvius_monai.data.dataset import find_fragments
from vesuvius_monai.errors import VesuviusError


def alias_bomb(levels: int = 8, width: int = 9, indent: str = "") -> str:
    """A YAML mapping of ``levels`` anchors, each a list of ``width`` aliases of the one before: ``width ** levels``
    values in a few hundred bytes."""
    lines = [f"{indent}l0: &l0 [{', '.join(['x'] * width)}]"]
    for level in range(1, levels + 1):
        lines.append(f"{indent}l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_quickly():
    with pytest.raises(VesuviusError, match=r"bomb\.yaml was refused: its aliases \(\*name\) expand to \d+ values"):
        load_yaml(alias_bomb(levels=12), "config file bomb.yaml")


@pytest.mark.parametrize("text", ["a: &a [*a]", "a: &a {b: {c: *a}}"])
def test_a_recursive_document_is_refused(text):
    with pytest.raises(VesuviusError, match="refused: an alias .* refers to a node that contains it"):
        load_yaml(text, "config file x.yaml")


def test_absurd_nesting_is_refused():
    with pytest.raises(VesuviusError, match="x.yaml was refused: it is nested too deeply"):
        load_yaml("a: " + "[" * 5000 + "]" * 5000, "config file x.yaml")


def test_a_few_aliases_still_read_as_before():
    text = "base: &b {lr: 0.1, steps: [1, 2]}\nfirst: *b\nsecond: {<<: *b, lr: 0.2}\n"
    assert load_yaml(text, "x") == yaml.safe_load(text)
    many = "v: &v [" + ", ".join(["1"] * 50) + "]\nw: [" + ", ".join(["*v"] * (MAX_ALIAS_NODES // 60)) + "]\n"
    assert load_yaml(many, "x") == yaml.safe_load(many)


def test_plain_values_only():
    with pytest.raises(VesuviusError, match="x.yaml is not valid YAML"):
        load_yaml("a: !!python/object/apply:os.system ['true']", "config file x.yaml")


def test_errors_are_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: [unclosed\nb: 1\n")
    with pytest.raises(VesuviusError) as err:
        read_yaml_mapping(path, "config file")
    assert "\n" not in str(err.value) and "c.yaml is not valid YAML" in str(err.value)


# --------------------------------------------------------------------------- through the command line


def test_train_refuses_a_bomb_under_model_kwargs_before_creating_anything(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmodel:\n  kwargs:\n" + alias_bomb(indent="    "))
    before = config.read_bytes()
    assert main(["train", "--config", str(config)]) == 2
    line = error_line(capsys)
    assert "config file" in line and "bomb.yaml was refused" in line
    assert not (tmp_path / "run").exists() and config.read_bytes() == before


def test_an_override_bomb_is_refused(tmp_path, capsys):
    value = "[&a [x, x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], " \
            "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c], " \
            "&e [*d, *d, *d, *d, *d, *d, *d, *d, *d], [*e, *e, *e, *e, *e, *e, *e, *e, *e]]"
    assert main(["train", f"output_dir={tmp_path / 'run'}", f"model.kwargs.bomb={value}"]) == 2
    line = error_line(capsys)
    assert "override 'model.kwargs.bomb=" in line and "was refused" in line
    assert not (tmp_path / "run").exists()


def test_a_dataset_yaml_bomb_is_refused(synthetic_root, tmp_path):
    dataset = tmp_path / "data.yaml"
    dataset.write_text(alias_bomb() + f"fragments:\n  - {{image: {synthetic_root}/images/frag_000.nii.gz}}\n")
    with pytest.raises(VesuviusError, match=r"dataset file .*data\.yaml was refused: its aliases"):
        find_fragments(DataConfig(dataset=str(dataset)))


def test_a_plan_file_bomb_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.yaml").write_text("format: vesuvius_monai.plan/1\n" + alias_bomb())
    assert main(["train", f"output_dir={run}"]) == 2
    assert "plan file" in (line := error_line(capsys)) and "plan.yaml was refused" in line
    assert sorted(p.name for p in run.iterdir()) == ["plan.yaml"]


def test_a_synth_record_bomb_is_refused(tmp_path, capsys):
    (tmp_path / "synth.yaml").write_text(alias_bomb())
    assert main(["synth", f"data.root={tmp_path}"]) == 2
    assert "synth.yaml was refused" in error_line(capsys)


def test_unknown_model_keywords_are_refused_before_the_run_folder_exists(tmp_path, capsys):
    assert main(["train", f"output_dir={tmp_path / 'run'}", "model.kwargs.bogus=1"]) == 2
    assert "unknown keyword 'bogus'" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_model_keyword_values_are_refused_before_the_run_folder_exists(tmp_path, capsys):
    assert main(["train", f"output_dir={tmp_path / 'run'}", "model.kwargs.depth=0"]) == 2
    assert "model.kwargs.depth" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_file_too_large_or_not_text_is_one_line(tmp_path, monkeypatch):
    import vesuvius_monai.config.resolve as resolve

    path = tmp_path / "c.yaml"
    path.write_bytes(b"a: 1\n\xff\xfe\n")
    with pytest.raises(VesuviusError, match=r"config file .*c\.yaml is not UTF-8 text \(byte 5\)"):
        read_yaml_mapping(path, "config file")
    path.write_text("a: [" + ", ".join(["1"] * 100) + "]\n")
    monkeypatch.setattr(resolve, "MAX_YAML_BYTES", 100)
    with pytest.raises(VesuviusError, match=r"c\.yaml was refused: it holds \d+ bytes, more than the 100"):
        read_yaml_mapping(path, "config file")
