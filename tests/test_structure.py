"""The package's structure: the API process imports no torch, and the import rules between folders hold
(every import parsed with ast, those inside functions included)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "radixserve")


def test_api_process_imports_no_torch():
    code = ("import sys\nimport radixserve.server.app, radixserve.managers.tokenizer_manager\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert not any(m.startswith(('radixserve.engine', 'radixserve.model.', 'radixserve.cache')) "
            "for m in sys.modules), sorted(m for m in sys.modules if m.startswith('radixserve'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """module → the radixserve modules it imports (anywhere in its body). `from package import module`
    counts as importing the module (the package's __init__ then only binds the name)."""
    graph: dict[str, set[str]] = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            module = _module_name(path)
            package = module if name == "__init__.py" else module.rpartition(".")[0]
            found: set[str] = set()
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parts = package.split(".")
                        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                    found.add(base)
                    found.update(f"{base}.{a.name}" for a in node.names)
            graph[module] = {m for m in found if m.split(".")[0] == "radixserve"}
    for module, deps in graph.items():
        graph[module] = {d for d in deps if d in graph and not any(o.startswith(d + ".") for o in deps & graph.keys())}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), set()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else parts[-1]


def _in(module: str, *folders: str) -> bool:
    return any(module == f"radixserve.{f}" or module.startswith(f"radixserve.{f}.") for f in folders)


def test_server_reaches_no_engine_side():
    graph = _imports()
    for module in [m for m in graph if _in(m, "server")]:
        bad = sorted(m for m in _reach(graph, module)
                     if _in(m, "engine", "model", "cache", "kernels") or m == "radixserve.sampling.sampler")
        assert not bad, f"{module} reaches {bad}"


def test_model_cache_sampling_import_no_api_side():
    graph = _imports()
    for module, deps in graph.items():
        if _in(module, "model", "cache", "sampling", "kernels"):
            bad = sorted(d for d in deps if _in(d, "server", "managers"))
            assert not bad, f"{module} imports {bad}"
        if _in(module, "cache"):
            assert not any(_in(d, "model") for d in deps), f"{module} imports the model"
        if _in(module, "kernels"):
            assert not any(not _in(d, "kernels") for d in deps), f"{module} imports outside kernels/: {deps}"


def test_no_import_loop_between_folders():
    graph = _imports()
    edges: dict[str, set[str]] = defaultdict(set)
    for module, deps in graph.items():
        for dep in deps:
            a, b = _folder(module), _folder(dep)
            if a != b:
                edges[a].add(b)
    for a in list(edges):
        for b in edges[a]:
            assert a not in _reach(edges, b) | {b}, f"import loop between {a}/ and {b}/"


def test_processes_share_only_the_contract():
    """What the API process imports from the engine's side of the package is the contract: messages and
    the torch-free modules it declares (sampling parameters, the LoRA names, files, config)."""
    graph = _imports()
    api = set()
    for module in [m for m in graph if _in(m, "server", "managers")]:
        api |= _reach(graph, module) | {module}
    engine = set()
    for module in [m for m in graph if _in(m, "engine")]:
        engine |= _reach(graph, module) | {module}
    shared = api & engine
    allowed = {"radixserve", "radixserve.config", "radixserve.model_files", "radixserve.managers",
               "radixserve.managers.messages", "radixserve.sampling", "radixserve.sampling.params",
               "radixserve.lora", "radixserve.lora.refs", "radixserve.constrained", "radixserve.constrained.schema"}
    assert shared <= allowed, sorted(shared - allowed)


def test_both_schedulers_implement_the_engine_interface():
    from radixserve.engine.encoder_scheduler import EncoderScheduler
    from radixserve.engine.process import EngineScheduler
    from radixserve.engine.scheduler import Scheduler

    members = [name for name in vars(EngineScheduler) if not name.startswith("_")]
    assert "step" in members and "take_control" in members
    for cls in (Scheduler, EncoderScheduler):
        missing = [name for name in members if not callable(getattr(cls, name, None))]
        assert not missing, f"{cls.__name__} lacks {missing}"
