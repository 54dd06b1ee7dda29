"""The shape of tools/: layers that import only downwards, no import cycle, imports inside functions only for a reason
they state, and no torch, ultralytics or ModelOpt in the modules that build and run engines.

Layers, lowest first: tools/core/ (errors, command lines, files, layout, records, recipe and grid schemas, the sweep
table), tools/yolo/ (what is YOLO11's: preprocessing, decoding, graph facts, Q/DQ rules, calibrators, per-layer
analysis), then the verbs (`python -m tools.<verb>`), which may import each other but never in a circle.
"""
import ast
import subprocess
import sys

from conftest import REPO

TOOLS = REPO / "tools"
LAYERS = ("tools.core", "tools.yolo")  # a module may import its own layer and those before it, never one after
# the modules that build and run engines: they run on the GPU side (TensorRT), where torch, ultralytics and ModelOpt
# are not installed (requirements-device.txt)
ENGINE_SIDE = ("tools.engine", "tools.trtexec_py", "tools.bench", "tools.compare", "tools.evaluate", "tools.e2e",
               "tools.implicit_calib", "tools.ultralytics_engine", "tools.pipeline", "tools.sweep", "tools.profile",
               "tools.yolo.layers", "tools.predict", "tools.deploy_graph", "tools.summary", "tools.report",
               "tools.sizes", "tools.polygraphy_inspect")


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(TOOLS.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(tree: ast.Module):
    """(module imported, line, whether inside a function) of every import statement."""
    def walk(node, inside):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                yield from ((a.name, child.lineno, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                if child.module == "tools" or child.module.startswith("tools."):
                    # `from tools.yolo import graph` imports the module tools.yolo.graph
                    yield from ((f"{child.module}.{a.name}", child.lineno, inside) for a in child.names)
                else:
                    yield child.module, child.lineno, inside
            yield from walk(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    yield from walk(tree, False)


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, tree in mods.items():
        found = set()
        for target, _, _ in imports(tree):
            while target and target not in mods:  # `tools.core.files.REPO` -> tools.core.files
                target = target.rpartition(".")[0]
            if target and target != name and target != "tools":
                found.add(target)
        edges[name] = found
    return edges


def layer(module: str) -> int:
    return next((i for i, prefix in enumerate(LAYERS) if module.startswith(prefix + ".") or module == prefix),
                len(LAYERS))


def test_no_import_cycle():
    edges = graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_layers_import_only_downwards():
    upward = [f"{m} -> {n}" for m, ns in graph().items() for n in sorted(ns) if layer(n) > layer(m)]
    assert not upward, "core must not import yolo or verbs, yolo must not import verbs: " + ", ".join(upward)


def test_imports_inside_functions_are_third_party_and_say_why():
    bad = []
    for name, tree in modules().items():
        path = REPO / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = REPO / name.replace(".", "/") / "__init__.py"
        lines = path.read_text().splitlines()
        for target, line, inside in imports(tree):
            if not inside:
                continue
            if target.startswith("tools"):
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {target} inside a function (import it at the top)"
                           )
            elif "#" not in lines[line - 1] and not lines[line - 2].strip().startswith("#"):
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {target} inside a function without saying why")
    assert not bad, "\n".join(bad)


def test_engine_side_imports_no_torch_ultralytics_or_modelopt():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in ENGINE_SIDE) +
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ultralytics', 'modelopt'}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


def test_the_graph_sees_what_the_modules_import():
    """The checks above would pass on an empty graph: they must see the edges that exist."""
    edges = graph()
    assert "tools.core.recipe" in edges["tools.pipeline"] and "tools.core.files" in edges["tools.core.recipe"]
    assert "tools.yolo.graph" in edges["tools.yolo_graph"] and layer("tools.yolo.graph") == 1


def test_the_readme_layout_names_every_module():
    """README's layout block lists the verbs and the modules of core/ and yolo/: a module added or moved shows there."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("\ntools/    "):text.index("\nmodels/yolo11/")]
    for folder in ("tools", "tools/core", "tools/yolo"):
        line = next(i for i in block.split("\n") if i.startswith(folder + "/ "))  # the folder has its own entry
        assert line
        for path in sorted((REPO / folder).glob("*.py")):
            if path.stem != "__init__":
                assert path.stem in block, f"{folder}/{path.name} is not in README's layout block"
