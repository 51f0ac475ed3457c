"""The README and docs/ hold what a user copies: their links must resolve and their run commands must be ones the
scripts accept. Fast: the scripts are imported and their flags parsed, nothing is trained."""
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ["grpo", "hapo", "pcl", "one_shot", "ppo", "eval"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"#{1,6} (.*)", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose(page: Path) -> str:
    """The page without its fenced code, where brackets and parentheses are code, not links."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)


def relative_links() -> list[tuple[Path, str]]:
    return [(page, target) for page in PAGES for target in LINK.findall(prose(page))
            if not re.match(r"[a-z]+:", target)]


def run_commands() -> list:
    """Every fenced `python <script>.py ...` or `torchrun ... <script>.py ...` line (backslash continuations joined)
    as pytest params (script, flags), named page:line; a `...` token stands for flags given elsewhere on the page and
    is dropped, and `--help` is no run."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
            first_line = text.count("\n", 0, block.start(1)) + 1
            lines = block.group(1).split("\n")
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i]
                i += 1
                if line.split()[:1] not in (["python"], ["torchrun"]):
                    continue
                words = shlex.split(line, comments=True)
                if "--help" in words:
                    continue
                scripts = [j for j, w in enumerate(words) if re.fullmatch(r"\w+\.py", w)]
                if not scripts or (words[0] == "python" and scripts[0] != 1) or words[scripts[0]][:-3] not in SCRIPTS:
                    continue
                j = scripts[0]
                label = f"{page.relative_to(ROOT).as_posix()}:{first_line + start}"
                found.append(pytest.param(words[j][:-3], [w for w in words[j + 1:] if w != "..."], id=label))
    return found


def test_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    expected = {"README.md"} | {f"docs/{n}.md" for n in
                                ("grpo", "hapo", "pcl", "one_shot", "ppo", "verify", "eval", "distributed", "logprob")}
    assert expected <= names, f"missing: {sorted(expected - names)}"


def test_relative_links_resolve():
    links = relative_links()
    assert len(links) >= 20, "the README links every docs page and the pages link each other"
    broken = []
    for page, target in links:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.name}: {target} (no heading with that anchor)")
    assert not broken, "\n".join(broken)


def test_every_paper_script_has_a_real_run_command():
    scripts = {p.values[0] for p in run_commands() if "--model" in p.values[1]}
    assert set(SCRIPTS) <= scripts, f"no real-run command for: {sorted(set(SCRIPTS) - scripts)}"


@pytest.mark.parametrize("script,flags", run_commands())
def test_run_command_is_accepted_by_its_script(script, flags, request, capsys):
    sys.path.insert(0, str(ROOT))
    try:
        module = importlib.import_module(script)
    finally:
        sys.path.remove(str(ROOT))
    try:
        args = module.parse_args(flags)
        if hasattr(module, "check_choices"):
            module.check_choices(args)
    except SystemExit:
        pytest.fail(f"{request.node.callspec.id}: {script}.py rejects {' '.join(flags)}\n{capsys.readouterr().err}")
