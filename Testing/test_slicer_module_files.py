"""The extension's files, checked by parsing (the Slicer application itself cannot run here):
the Qt Designer .ui file against the widget names BrainLesionSAM.py looks up, the module and
extension CMakeLists against the files they must list, the extension catalogue entry against the
index's schema rules, and Resources/requirements.txt against pyproject.toml."""
import ast
import fnmatch
import json
import re
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
MODULE = REPOSITORY / "BrainLesionSAM"
UI_FILE = MODULE / "Resources" / "UI" / "BrainLesionSAM.ui"
MODULE_SCRIPT = MODULE / "BrainLesionSAM.py"

QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QProgressBar", "QSpinBox", "QCheckBox",
              "QLineEdit", "QTableView", "QGroupBox", "QToolButton", "QPlainTextEdit", "QTextBrowser"}
MRML_WIDGETS = ("qMRML", "qSlicerMarkupsPlaceWidget")


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return [item for item in match.group(1).split() if not item.startswith("#")]


def module_files(relative_to: Path, pattern: str, exclude=("Testing", "__pycache__", "ExtensionsIndex")) -> set[str]:
    return {str(p.relative_to(relative_to)) for p in relative_to.rglob(pattern)
            if p.is_file() and not any(part in exclude for part in p.relative_to(relative_to).parts)}


# ----------------------------------------------------------------------------- the .ui file

@pytest.fixture(scope="module")
def ui():
    return ElementTree.parse(UI_FILE).getroot()  # raises on malformed XML


def test_ui_file_is_qt_designer_xml_with_declared_custom_widgets(ui):
    assert ui.tag == "ui" and ui.get("version") == "4.0"
    assert ui.findtext("class") == "BrainLesionSAM"
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "BrainLesionSAM"
    declared = {c.findtext("class"): c for c in ui.iter("customwidget")}
    for custom in declared.values():
        assert custom.findtext("header") == f"{custom.findtext('class')}.h"
        assert custom.findtext("extends") in QT_CLASSES | set(declared) | {"QTableView"}
    names = []
    for widget in ui.iter("widget"):
        cls = widget.get("class")
        assert cls in QT_CLASSES or cls in declared, f"widget {widget.get('name')} of undeclared class {cls}"
        names.append(widget.get("name"))
    assert len(names) == len(set(names)), "widget names must be unique"
    for layout in ui.iter("layout"):
        assert layout.get("class") in {"QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout"}


def test_every_widget_the_module_uses_is_in_the_ui(ui):
    names = {w.get("name") for w in ui.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SCRIPT.read_text()))
    selectors = ast.literal_eval(re.search(r"MODALITY_SELECTORS = (\{.*?\})", MODULE_SCRIPT.read_text()).group(1))
    used |= set(selectors.values())
    assert used and used <= names, f"looked up but missing in the .ui: {sorted(used - names)}"
    for required in ("t1Selector", "t1ceSelector", "t2Selector", "flairSelector", "methodComboBox",
                     "outputSegmentationSelector", "deviceComboBox", "weightsComboBox", "segmentButton",
                     "progressBar", "roiSelector", "refineButton", "volumesTableView", "caseWeightsTableView"):
        assert required in used, f"{required} is not wired in BrainLesionSAM.py"


def test_mrml_widgets_get_the_scene_and_selectors_have_the_right_node_types(ui):
    connected = {c.findtext("receiver") for c in ui.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)" and c.findtext("sender") == "BrainLesionSAM"}
    mrml_widgets = {w.get("name") for w in ui.iter("widget")
                    if w.get("class").startswith(MRML_WIDGETS) and w.get("name") != "BrainLesionSAM"}
    assert mrml_widgets == connected

    def node_types(name):
        widget = next(w for w in ui.iter("widget") if w.get("name") == name)
        prop = next(p for p in widget.findall("property") if p.get("name") == "nodeTypes")
        return [s.text for s in prop.iter("string")]

    for name in ("t1Selector", "t1ceSelector", "t2Selector", "flairSelector"):
        assert node_types(name) == ["vtkMRMLScalarVolumeNode"]
    assert node_types("outputSegmentationSelector") == ["vtkMRMLSegmentationNode"]
    assert node_types("roiSelector") == ["vtkMRMLMarkupsROINode"]


# ----------------------------------------------------------------------------- the module script

def test_module_script_has_module_widget_logic_and_test():
    tree = ast.parse(MODULE_SCRIPT.read_text())
    classes = {node.name: [ast.unparse(base) for base in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["BrainLesionSAM"] == ["ScriptedLoadableModule"]
    assert classes["BrainLesionSAMWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["BrainLesionSAMLogic"] == ["ScriptedLoadableModuleLogic", "SegmentationLogic"]
    assert classes["BrainLesionSAMTest"] == ["ScriptedLoadableModuleTest"]
    test_methods = [n.name for n in next(c for c in tree.body if getattr(c, "name", "") == "BrainLesionSAMTest").body
                    if isinstance(n, ast.FunctionDef)]
    assert "runTest" in test_methods and sum(m.startswith("test_") for m in test_methods) >= 2
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert "torch" not in imported and "monai" not in imported


@pytest.mark.parametrize("path", sorted(module_files(MODULE / "BrainLesionSAMSlicer", "*.py")))
def test_logic_and_glue_import_no_qt(path):
    tree = ast.parse((MODULE / "BrainLesionSAMSlicer" / path).read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not names & {"qt", "ctk", "PythonQt", "PyQt5", "PySide2"}, path
    # The scene comes in as an argument: no use of the application's globals.
    globals_used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name) and node.value.id == "slicer"} & {"app", "mrmlScene", "modules"}
    assert not globals_used, (path, globals_used)


# ----------------------------------------------------------------------------- CMake

def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = [s.replace("${MODULE_NAME}", "BrainLesionSAM") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    resources = [s.replace("${MODULE_NAME}", "BrainLesionSAM") for s in cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    assert set(scripts) == module_files(MODULE, "*.py"), "MODULE_PYTHON_SCRIPTS must list every module script"
    assert set(resources) == module_files(MODULE, "*") - module_files(MODULE, "*.py") - {
        p for p in module_files(MODULE, "*") if p.endswith((".pyc", "CMakeLists.txt"))}
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    testing = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for script in re.findall(r"slicer_add_python_unittest\(SCRIPT (\S+)\)", testing):
        assert (MODULE / "Testing" / "Python" / script).is_file()


def test_library_globs_cover_every_tracked_library_file():
    text = (MODULE / "CMakeLists.txt").read_text()
    patterns = [p.replace("${_library_root}/", "") for p in re.findall(r"\$\{_library_root\}/BrainLesionSAMLib/\S+", text)]
    assert "BrainLesionSAMLib/*.py" in patterns
    tracked = subprocess.run(["git", "ls-files", "BrainLesionSAMLib"], cwd=REPOSITORY, capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked
    # GLOB_RECURSE: '*' also crosses folders, as fnmatch's does.
    uncovered = [f for f in tracked if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert uncovered == [], f"the extension would not ship {uncovered}; add a glob to BrainLesionSAM/CMakeLists.txt"


def test_extension_cmake_has_the_metadata():
    text = (REPOSITORY / "CMakeLists.txt").read_text()
    values = dict(re.findall(r'set\((EXTENSION_\w+) "(.*?)"\)', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert key in values, key
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    assert "add_subdirectory(BrainLesionSAM)" in text
    icon = values["EXTENSION_ICONURL"].rsplit("/", 1)[1]
    assert (REPOSITORY / icon).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (REPOSITORY / icon).read_bytes() == (MODULE / "Resources" / "Icons" / "BrainLesionSAM.png").read_bytes()


def test_extension_catalogue_entry_follows_the_index_schema():
    entry = json.loads((MODULE / "ExtensionsIndex" / "BrainLesionSAM.json").read_text())
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
               "scm_type", "scm_url", "tier"}  # slicer-extension-catalog-entry-schema v1.0.1
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    cmake = (REPOSITORY / "CMakeLists.txt").read_text()
    values = dict(re.findall(r'set\((\w+) "(.*?)"\)', cmake))
    assert entry["category"] == values["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == values["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"] == values["BrainLesionSAM_REPOSITORY_URL"] + ".git"
    assert entry["tier"] in (1, 3, 5)


# ----------------------------------------------------------------------------- requirements

def test_requirements_have_floor_and_ceiling_and_follow_pyproject():
    import tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {Requirement(r).name.lower(): Requirement(r) for r in pyproject}
    lines = [line.split("#")[0].strip() for line in (MODULE / "Resources" / "requirements.txt").read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line]
    names = {r.name.lower() for r in requirements}
    assert names == set(declared) - {"torch", "torchvision"}, "requirements.txt must list pyproject's dependencies"
    for requirement in requirements:
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {">=", "<"}, f"{requirement}: give a floor (>=) and a ceiling (<)"
        floor = next(s.version for s in requirement.specifier if s.operator == ">=")
        assert f">={floor}" in str(declared[requirement.name.lower()].specifier), (
            f"{requirement.name}: floor {floor} differs from pyproject.toml")
