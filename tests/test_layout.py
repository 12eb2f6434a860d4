"""The layout of the code (docs/design.md, section 3): every module imports only modules below it (no cycle), and
no command-line program imports another program; each file opens with a docstring."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("examples/*.py")])


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


MODULES = {module_name(p): p for p in SOURCES if p.name != "__init__.py"}


def local_imports(path: Path) -> set[str]:
    """The project modules a file imports, at any depth of its code (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found |= {n for n in names if n in MODULES}
    return found


def is_program(path: Path) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in ast.parse(path.read_text()).body)


GRAPH = {name: local_imports(path) for name, path in MODULES.items()}
PROGRAMS = {name for name, path in MODULES.items() if is_program(path)}


def find_cycle(graph: dict[str, set[str]]):
    """A list of modules that import each other in a circle, or None."""
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[name] = "done"
        stack.pop()
        return None

    return next((c for name in sorted(graph) if name not in state and (c := visit(name))), None)


def test_the_programs_are_found():
    assert {"generate", "train_heads", "quantize", "bench", "scripts.convert_gguf"} <= PROGRAMS
    assert {"model", "heads", "checkpoint", "s3d", "cli", "tokenizer"}.isdisjoint(PROGRAMS)


def test_imports_run_one_way():
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH))}"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_no_program_imports_a_program(program):
    assert not GRAPH[program] & PROGRAMS, f"{program} imports {GRAPH[program] & PROGRAMS}"


def test_model_is_the_network_only():
    assert GRAPH["model"] == set()


def test_the_checks_catch_what_they_are_for():
    """The cycle finder and the program detector on made-up graphs: they must fail where the real ones must not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_file_opens_with_a_docstring(name):
    assert ast.get_docstring(ast.parse(MODULES[name].read_text())), f"{name} has no docstring"
