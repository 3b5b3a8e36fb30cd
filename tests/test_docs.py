"""The docs hold together: every relative link reaches a file and heading, and each command's page
names exactly the flags its parser has (so ``--help`` and the docs say the same thing)."""

import argparse
import re
from pathlib import Path

import pytest

from t2sda.__main__ import _parser as t2sda_parser
from t2sda.ray_glue.search import _parser as tune_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _prose(text: str) -> str:
    """The page without fenced code and inline code spans (where a ``[x](y)`` is no link)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, formatting and punctuation dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text.replace("`", "")).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            slug = _slug(m.group(1))
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _broken_links(page: Path) -> list[str]:
    """Relative link targets of ``page`` whose file or heading is missing."""
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = page.parent / file if file else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_heading(page):
    assert _broken_links(page) == [], f"{page.relative_to(ROOT)}: broken links"


def test_link_check_catches_what_it_should(tmp_path):
    (tmp_path / "a.md").write_text("# Top: `tune.py` (one)\n## Top: `tune.py` (one)\n"
                                   "```\n# not a heading\n```\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#top-tunepy-one) [dup](a.md#top-tunepy-one-1) [code](a.md#not-a-heading) "
                    "[gone](c.md) [web](https://example.com/x.md) `[in code](c.md#x)` [self](#top) "
                    "[nope](#bottom)\n# Top\n")
    assert _broken_links(page) == ["a.md#not-a-heading", "c.md", "#bottom"]


def test_slugs_follow_github():
    assert _slug("Label-free selection: `--metric`") == "label-free-selection---metric"
    assert _slug("GPU: `scripts/gpu_check.sh`") == "gpu-scriptsgpu_checksh"
    assert _slug("The embedded benchmark: `digits` (DigitScenes → DigitScenes-M)") == \
        "the-embedded-benchmark-digits-digitscenes--digitscenes-m"


# ---- flags: each command's page against its parser ------------------------------------------

def _sub(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


# command -> (how a line invokes it, its parser, the page that documents it)
COMMANDS = {
    "tune.py": (r"(?:python )?tune\.py|scripts/run\.sh", lambda: tune_parser(), "docs/search.md"),
    "train": (r"(?:python -m |^|\s)t2sda(?:\.train| train)\b", lambda: _sub(t2sda_parser(), "train"),
              "docs/training.md"),
    "evaluate": (r"t2sda evaluate\b", lambda: _sub(t2sda_parser(), "evaluate"), "docs/inference.md"),
    "predict": (r"t2sda predict\b", lambda: _sub(t2sda_parser(), "predict"), "docs/inference.md"),
    "export": (r"t2sda export\b", lambda: _sub(t2sda_parser(), "export"), "docs/export.md"),
    "data check": (r"t2sda data check\b", lambda: _sub(t2sda_parser(), "data", "check"),
                   "docs/datasets.md"),
}
# What other programs a line may invoke; their flags are theirs, not the commands' above.
OTHER = re.compile(r"scripts/(?!run\.sh)\S+|torchrun|pytest|\bpip\b|\bray (?:up|down|job|exec|dashboard)"
                   r"|kubectl|docker|\baws\b|tensorboard|t2sda\.data\.\w+|git |\bbash\b")


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def _invocations(text: str) -> list[tuple[str, str]]:
    """(command, the rest of the line) for every line of code that runs one of COMMANDS.

    A usage block's continuation lines (indented, starting with ``[`` or ``--``) and lines
    ending in a backslash belong to the line above; the command's part ends where another
    program starts (``&&``, ``|``, a pipe into another tool).
    """
    code = [m.group(0) for m in FENCE.finditer(text)] + re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    lines: list[str] = []
    for block in code:
        for line in block.splitlines():
            stripped = line.strip()
            if lines and (lines[-1].endswith("\\") or re.match(r"\[|--", stripped) and line[:1] == " "):
                lines[-1] = lines[-1].rstrip("\\") + " " + stripped
            else:
                lines.append(stripped)
    found = []
    for line in lines:
        line = line.split("#", 1)[0] if not line.startswith("#") else ""
        for part in re.split(r"&&|;|\|\s+(?=[a-z])", line):
            hits = [(m.start(), m.end(), name) for name, (pattern, _, _) in COMMANDS.items()
                    for m in [re.search(pattern, part)] if m]
            if not hits:
                continue
            start, end, name = min(hits)
            rest = part[end:]
            if other := OTHER.search(rest):
                rest = rest[:other.start()]
            found.append((name, rest))
    return found


def _named_flags(text: str) -> dict[str, set[str]]:
    named: dict[str, set[str]] = {}
    for name, rest in _invocations(text):
        named.setdefault(name, set()).update(FLAG.findall(rest))
    return named


def _choices_named(text: str, command: str) -> dict[str, set[str]]:
    """``--flag a|b|c`` in the command's usage lines: the values the docs offer."""
    offered: dict[str, set[str]] = {}
    for name, rest in _invocations(text):
        if name == command:
            for flag, values in re.findall(r"(--[a-z][a-z0-9-]*)[ =]\[?([\w.-]+(?:\|[\w.-]+)+)", rest):
                offered.setdefault(flag, set()).update(values.split("|"))
    return offered


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_a_page_gives_a_command_exists(page):
    unknown = {f"{name} {flag}" for name, flags in _named_flags(page.read_text()).items()
               for flag in flags - set(_flags(COMMANDS[name][1]()))}
    assert unknown == set()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_a_command_is_on_its_page(command):
    _, make, page = COMMANDS[command]
    text = (ROOT / page).read_text()
    # Named anywhere on the page: in a usage line, a flag table or the prose.
    missing = set(_flags(make())) - {"--help"} - set(FLAG.findall(text))
    assert missing == set(), f"{page} does not document {sorted(missing)} (see --help)"


@pytest.mark.parametrize("command", COMMANDS)
def test_the_values_a_page_offers_are_choices_of_the_parser(command):
    _, make, page = COMMANDS[command]
    flags = _flags(make())
    for flag, values in _choices_named((ROOT / page).read_text(), command).items():
        if flags[flag].choices is not None:
            assert values <= set(flags[flag].choices), (page, flag, values - set(flags[flag].choices))


def test_flag_check_reads_usage_lines_as_a_reader_does():
    text = ("```\npython tune.py --space NAME [--num-samples N]\n"
            "               [--metric a|b] --bogus\n"
            "python -m t2sda train [--run-dir X | --config Y] && tensorboard --logdir X\n"
            "scripts/bench_train.py --steps 3   # tune.py --not-this\n```\n"
            "Run `python -m t2sda evaluate --tta` or `torchrun --nproc_per_node 2 -m t2sda train --set`.\n")
    assert _named_flags(text) == {"tune.py": {"--space", "--num-samples", "--metric", "--bogus"},
                                  "train": {"--run-dir", "--config", "--set"}, "evaluate": {"--tta"}}
    assert _choices_named(text, "tune.py") == {"--metric": {"a", "b"}}
