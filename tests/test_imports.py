"""Import hygiene: the pack loads the way ComfyUI loads it, and the layers import one way.

- ComfyUI imports a pack folder from ``<dir>/__init__.py`` under a module name equal to the
  folder's absolute path (dots replaced by ``_x_``), with its own ``nodes`` / ``utils`` /
  ``folder_paths`` already in ``sys.modules``. We do exactly that in a subprocess (with
  stand-ins for those ComfyUI modules), then validate the node mappings it exposes.
- An AST scan forbids absolute imports of our own subpackages and of ComfyUI's top-level names
  (they bind to ComfyUI's modules inside ComfyUI), except the adapter's guarded lazy imports.
- ``sundae_lib`` imports with ComfyUI, click and the other layers blocked.
- No two of our modules import each other, directly or around a loop (``TYPE_CHECKING`` and
  function-level imports count too).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("nodes", "sundae_lib", "trainer")
OWN_SUBPACKAGES = {"nodes", "sundae_lib", "trainer", "comfyui_sundae", "utils", "models"}
# ComfyUI's own top-level modules: inside ComfyUI an absolute import of these names binds to
# ComfyUI's module, not ours (docs/design.md "Layers")
COMFY_NAMES = {
    "nodes", "server", "execution", "folder_paths", "latent_preview", "node_helpers", "protocol",
    "main", "cuda_malloc", "new_updater", "comfyui_version", "comfy", "comfy_api", "comfy_api_nodes",
    "comfy_config", "comfy_execution", "comfy_extras", "app", "utils", "middleware", "api_server",
    "alembic_db", "models", "input", "output", "custom_nodes", "script_examples",
}
ADAPTER = REPO / "nodes" / "comfy_adapter.py"
ADAPTER_ALLOWED = {"folder_paths", "comfy"}



def design_nodes() -> dict[str, str]:
    """Node id -> display name as docs/design.md "ComfyUI nodes" states them: the contract the
    package must keep (saved workflows refer to the ids)."""
    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("## ComfyUI nodes", 1)[1].split("\n## ", 1)[0]
    pairs = dict(re.findall(r"`(Sundae\w+)`\s+\(([^)]+)\)", section))
    if len(pairs) != 6:
        raise AssertionError(f"docs/design.md 'ComfyUI nodes' should name 6 nodes, found {pairs}")
    return pairs


EXPECTED_NODES = design_nodes()


def package_files() -> list[Path]:
    files = [REPO / "__init__.py"]
    for d in PACKAGE_DIRS:
        files += sorted((REPO / d).rglob("*.py"))
    return files


# --------------------------------------------------------------------------------------------
# (a) imported exactly as ComfyUI imports it
# --------------------------------------------------------------------------------------------

COMFY_STYLE_IMPORT = textwrap.dedent(
    r"""
    import importlib.util, json, os, sys, types

    pack_dir, models_dir = sys.argv[1], sys.argv[2]

    # ComfyUI's own top-level modules are already imported when packs load
    for name in ("nodes", "utils", "server"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["nodes"].COMFY_SENTINEL = True

    fp = types.ModuleType("folder_paths")
    fp.models_dir = models_dir
    fp.supported_pt_extensions = {".ckpt", ".pt", ".bin", ".pth", ".safetensors"}
    # what extra_model_paths.yaml did before packs import: a user path for 'vqgan'
    fp.folder_names_and_paths = {"vqgan": (["/user/yaml/vqgan"], set())}

    def add_model_folder_path(name, path, is_default=False):  # ComfyUI's semantics
        if name in fp.folder_names_and_paths:
            paths, _ = fp.folder_names_and_paths[name]
            if path in paths:
                if is_default and paths[0] != path:
                    paths.remove(path); paths.insert(0, path)
            elif is_default:
                paths.insert(0, path)
            else:
                paths.append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0][:]
    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        out = []
        for root in paths:
            for dp, _, fs in os.walk(root):
                for f in fs:
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        out.append(os.path.relpath(os.path.join(dp, f), root))
        return sorted(out)
    fp.get_filename_list = get_filename_list
    def get_full_path(name, f):
        for root in fp.folder_names_and_paths[name][0]:
            if os.path.isfile(os.path.join(root, f)):
                return os.path.join(root, f)
    fp.get_full_path = get_full_path
    sys.modules["folder_paths"] = fp

    # nodes.py load_custom_node()
    module_name = pack_dir.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(pack_dir, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)

    def jsonable(x):
        if isinstance(x, (tuple, list)):
            return [jsonable(v) for v in x]
        if isinstance(x, dict):
            return {k: jsonable(v) for k, v in x.items()}
        return x if isinstance(x, (str, int, float, bool, type(None))) else repr(x)

    info = {}
    for node_id, cls in module.NODE_CLASS_MAPPINGS.items():
        spec_ = cls.INPUT_TYPES()
        info[node_id] = {
            "module": cls.__module__,
            "input": jsonable(spec_),
            "input_order": {k: list(v) for k, v in spec_.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "output_tooltips": list(getattr(cls, "OUTPUT_TOOLTIPS", [])),
            "name": node_id,
            "display_name": module.NODE_DISPLAY_NAME_MAPPINGS.get(node_id),
            "description": getattr(cls, "DESCRIPTION", ""),
            "category": getattr(cls, "CATEGORY", ""),
            "function": cls.FUNCTION,
            "has_function": callable(getattr(cls, cls.FUNCTION, None)),
            "output_node": getattr(cls, "OUTPUT_NODE", False),
        }
    print(json.dumps({
        "module_name": module_name,
        "info": info,
        "web_directory": getattr(module, "WEB_DIRECTORY", None),
        "folders": {k: [list(v[0]), sorted(v[1])] for k, v in fp.folder_names_and_paths.items()},
        "comfyui_sundae_imported": any(m == "comfyui_sundae" or m.startswith("comfyui_sundae.") for m in sys.modules),
        "nodes_is_comfy": getattr(sys.modules["nodes"], "COMFY_SENTINEL", False),
        "own_modules": sorted(m for m in sys.modules if m.startswith(module_name + ".")),
    }))
    """
)


@pytest.fixture(scope="module")
def comfy_loaded(tmp_path_factory):
    base = tmp_path_factory.mktemp("custom.nodes")  # a dot in the path: exercises "_x_"
    pack = base / "comfyui-sundae-test"
    pack.symlink_to(REPO, target_is_directory=True)
    models = base / "models"
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run(
        [sys.executable, "-c", COMFY_STYLE_IMPORT, str(pack), str(models)],
        capture_output=True, text=True, timeout=300, cwd=str(base), env=env,
    )
    assert res.returncode == 0, f"import as ComfyUI failed:\n{res.stderr[-4000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1]), pack, models


def test_comfy_style_import_uses_own_modules(comfy_loaded):
    data, pack, _ = comfy_loaded
    assert data["module_name"] == str(pack).replace(".", "_x_") and "_x_" in data["module_name"]
    assert not data["comfyui_sundae_imported"], "the pack must not depend on the name comfyui_sundae"
    assert data["nodes_is_comfy"], "ComfyUI's top-level 'nodes' module was replaced"
    for node_id, info in data["info"].items():
        assert info["module"].startswith(data["module_name"] + ".nodes."), (node_id, info["module"])
    assert data["web_directory"] and (REPO / data["web_directory"]).is_dir()


def test_model_folders_keep_user_yaml_entries(comfy_loaded):
    data, _, models = comfy_loaded
    folders = data["folders"]
    vq_paths, vq_exts = folders["vqgan"]
    assert vq_paths[0] == "/user/yaml/vqgan", "the extra_model_paths.yaml entry must be kept, first"
    assert vq_paths[1:] == [str(models / "vqgan"), str(REPO / "shipped_models" / "vqgan")]
    assert ".safetensors" in vq_exts and ".ckpt" in vq_exts and ".pkl" not in vq_exts
    sd_paths, sd_exts = folders["sundae"]
    assert sd_paths == [str(models / "sundae"), str(REPO / "shipped_models" / "sundae")]
    assert sd_exts == vq_exts


def test_node_mappings_as_comfyui_sees_them(comfy_loaded):
    info = comfy_loaded[0]["info"]
    assert {k: v["display_name"] for k, v in info.items()} == EXPECTED_NODES
    assert len(set(EXPECTED_NODES.values())) == len(EXPECTED_NODES)
    custom_types = {"SUNDAE_VQGAN", "SUNDAE_PRIOR", "SUNDAE_TOKENS", "IMAGE", "MASK"}
    for node_id, node in info.items():
        assert node_id.startswith("Sundae")
        assert node["category"].split("/")[0] == "sundae", node_id
        assert len(node["description"]) > 40, f"{node_id}: DESCRIPTION missing or too short"
        assert node["has_function"], f"{node_id}: FUNCTION {node['function']!r} is not a method"
        assert node["output"] and len(node["output_name"]) == len(node["output"]) == len(node["output_tooltips"])
        assert all(isinstance(t, str) and len(t) > 10 for t in node["output_tooltips"])
        assert set(node["output"]) <= custom_types
        assert set(node["input"]) <= {"required", "optional", "hidden"}
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
                where = f"{node_id}.{name}"
                tip = opts.get("tooltip", "")
                assert isinstance(tip, str) and tip.endswith(".") and len(tip) > 20, f"{where}: tooltip"
                if isinstance(kind, list):  # combo
                    assert all(isinstance(v, str) for v in kind), where
                    if "default" in opts:
                        assert opts["default"] in kind, where
                elif kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], where
                    if kind == "INT":
                        assert all(isinstance(opts[k], int) for k in ("min", "max", "default")), where
                elif kind == "BOOLEAN":
                    assert isinstance(opts["default"], bool), where
                elif kind == "STRING":
                    assert isinstance(opts["default"], str), where
                else:
                    assert kind in custom_types, f"{where}: unexpected type {kind!r}"
    seed = info["SundaeSampler"]["input"]["required"]["seed"][1]
    assert seed["control_after_generate"] is True and seed["max"] == 0xFFFFFFFFFFFFFFFF
    loaders = info["SundaeLoadVQGAN"]["input"]["required"]["vqgan_name"][0]
    assert "pixels (256 levels, grey)" in loaders and "pixels (16 levels, grey)" in loaders
    assert info["SundaeLoadVQGAN"]["input"]["required"]["dtype"][0] == ["auto", "fp32", "bf16", "fp16"]


def test_node_docs_exist(comfy_loaded):
    """Every node has help where the frontend looks (docs/design.md "ComfyUI nodes").

    The frontend (``src/services/nodeHelpService.ts``) fetches
    ``/extensions/<pack>/docs/<NodeId>/<locale>.md`` first, then ``docs/<NodeId>.md``. So
    ``<NodeId>/en.md`` answers English users without a 404, and ``<NodeId>.md`` is the fallback
    for every other locale. ``en.md`` is the source; ``<NodeId>.md`` must be an exact copy of it."""
    data = comfy_loaded[0]
    docs = REPO / data["web_directory"] / "docs"
    node_ids = set(data["info"])  # NODE_CLASS_MAPPINGS as ComfyUI sees them
    assert node_ids == set(EXPECTED_NODES)
    for node_id in sorted(node_ids):
        doc = docs / node_id / "en.md"
        assert doc.is_file(), f"missing node doc {doc.relative_to(REPO)} (the frontend's first request)"
        text = doc.read_text()
        assert text.startswith("# ") and len(text) > 300, f"{doc.relative_to(REPO)}: a '# Title' and real content"
        fallback = docs / f"{node_id}.md"
        assert fallback.is_file() and fallback.read_bytes() == doc.read_bytes(), (
            f"{fallback.relative_to(REPO)} must be a copy of {doc.relative_to(REPO)} (the fallback for "
            f"non-English locales): cp {doc.relative_to(REPO)} {fallback.relative_to(REPO)}"
        )
    stray = {p.relative_to(docs).as_posix() for p in docs.rglob("*") if p.is_file()}
    stray -= {f"{n}/en.md" for n in node_ids} | {f"{n}.md" for n in node_ids}
    assert not stray, f"docs for no node id (a typo in a folder name?): {sorted(stray)}"


# --------------------------------------------------------------------------------------------
# (b) import scan and layering
# --------------------------------------------------------------------------------------------


def _guarded_lazy(tree: ast.Module) -> set[int]:
    """Ids of Import/ImportFrom nodes inside a function body, in a try with an ImportError handler."""
    ok: set[int] = set()

    def handles_import_error(t: ast.Try) -> bool:
        for h in t.handlers:
            names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
            if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                return True
        return False

    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for t in ast.walk(fn):
                if isinstance(t, ast.Try) and handles_import_error(t):
                    for stmt in t.body:
                        for n in ast.walk(stmt):
                            if isinstance(n, (ast.Import, ast.ImportFrom)):
                                ok.add(id(n))
    return ok


def absolute_import_violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    allowed = _guarded_lazy(tree) if path == ADAPTER else set()
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops = [(a.name.split(".")[0], a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops = [(node.module.split(".")[0], node.module)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__"):
            arg = node.args[0] if node.args else None
            tops = [(arg.value.split(".")[0], arg.value)] if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith(".") else []
        else:
            continue
        for top, full in tops:
            if top in OWN_SUBPACKAGES:
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: absolute import of our own {full!r} — use a relative import")
            elif top in COMFY_NAMES and not (id(node) in allowed and top in ADAPTER_ALLOWED):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: import of ComfyUI's {full!r} outside nodes/comfy_adapter.py's guarded lazy imports")
    return bad


def test_no_absolute_imports_of_own_or_comfyui_modules():
    files = package_files()
    assert len(files) > 10
    problems = [p for f in files for p in absolute_import_violations(f)]
    assert not problems, "\n".join(problems)


def test_scan_catches_the_mistakes(tmp_path, monkeypatch):
    """The scanner itself: each of these lines must be reported."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    for line in ("import nodes", "from nodes.types import TokenBatch", "from sundae_lib import sample",
                 "import comfy.utils", "import folder_paths", "from comfyui_sundae.nodes import x",
                 "importlib.import_module('trainer.cli')"):
        f = tmp_path / "mod.py"
        f.write_text(f"import importlib\n{line}\n")
        assert absolute_import_violations(f), line
    # ... and an unguarded ComfyUI import in the adapter is reported too, a guarded one is not
    monkeypatch.setattr(sys.modules[__name__], "ADAPTER", tmp_path / "mod.py")
    (tmp_path / "mod.py").write_text("def f():\n    import folder_paths\n")
    assert absolute_import_violations(tmp_path / "mod.py")
    (tmp_path / "mod.py").write_text("def f():\n    try:\n        import folder_paths\n    except ImportError:\n        return None\n")
    assert not absolute_import_violations(tmp_path / "mod.py")


def test_sundae_lib_never_reaches_up_a_layer():
    for f in sorted((REPO / "sundae_lib").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                pytest.fail(f"{f.relative_to(REPO)}:{node.lineno}: sundae_lib imports from a parent package")


BLOCKED_IMPORT = textwrap.dedent(
    r"""
    import importlib, pkgutil, sys
    BLOCKED = ("comfy", "comfy_extras", "comfy_execution", "folder_paths", "click", "nodes", "server",
               "comfyui_sundae.nodes", "comfyui_sundae.trainer")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked import of {name!r} from sundae_lib")
            return None

    sys.meta_path.insert(0, Block())
    import comfyui_sundae.sundae_lib as lib
    names = [m.name for m in pkgutil.iter_modules(lib.__path__)]
    for name in names:
        importlib.import_module(f"comfyui_sundae.sundae_lib.{name}")
    for public in lib.__all__:
        getattr(lib, public)
    print(len(names))
    """
)


def test_sundae_lib_imports_without_comfyui_click_or_other_layers():
    res = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert int(res.stdout.strip()) >= 5


# --------------------------------------------------------------------------------------------
# (c) no import cycles between our modules
# --------------------------------------------------------------------------------------------


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def relative_import_graph(files: list[Path], root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (relative imports anywhere in the file: module
    level, ``if TYPE_CHECKING:`` and inside functions alike). ``from . import x`` depends on the
    submodule ``x`` when there is one, else on the package (whose ``__init__`` defines ``x``)."""
    modules = {_module_name(f, root): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                dep = sub if sub in modules else target
                if dep in modules and dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    graph = relative_import_graph(package_files(), REPO)
    assert "sundae_lib.vqgan_config" in graph["sundae_lib.vqgan_modules"]
    cycles = import_cycles(graph)
    assert not cycles, "modules that import each other (directly or around a loop): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_cycle_check_catches_a_type_checking_circle(tmp_path):
    """The checker itself: a circle closed only under ``if TYPE_CHECKING:`` (the old
    vqgan <-> vqgan_modules one) is reported; ``from . import b`` depends on the module b."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .b import B\n\nclass A: ...\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n\nclass B: ...\n"
    )
    (pkg / "c.py").write_text("from . import b\n")
    files = sorted(pkg.glob("*.py"))
    graph = relative_import_graph(files, tmp_path)
    assert graph["pkg.c"] == {"pkg.b"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]
    (pkg / "b.py").write_text("class B: ...\n")
    assert import_cycles(relative_import_graph(files, tmp_path)) == []
