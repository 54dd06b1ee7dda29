"""Every verb answers --help, takes the flags it shares with others from tools/core/cli.py (one default, one type, one
help each), and `make` hands TRT_VERSION to every verb that takes --trt."""
import argparse
import importlib
import re
import subprocess
import sys

import pytest
from conftest import REPO

from tools.core import cli
from tools.core.setup import add_setup_args

VERBS = sorted(p.stem for p in (REPO / "tools").glob("*.py") if "\ndef main(" in p.read_text())
# (parser, flag) where the name means something else: the export's own image size when none is given, a run's results
# folder relative to the checkout it ran in, the one model whose results a verb reads or removes (no recipe files:
# yolo11n unless given)
OWN_MEANING = {("python -m tools.ultralytics_engine", "--imgsz"), ("python -m tools.records publish", "--results"),
               ("python -m tools.report", "--model"), ("python -m tools.records publish", "--model"),
               ("python -m tools.records clean", "--model")}
NOT_SHARED = {"--onnx"}  # a setup flag whose meaning differs from verb to verb (the model to start from, to build, ...)


def canonical() -> dict[str, argparse.Action]:
    """The shared flags as tools/core/cli.py spells them."""
    ap = argparse.ArgumentParser()
    add_setup_args(ap)
    cli.add_imgsz(ap)
    cli.add_model(ap)
    return {a.option_strings[0]: a for a in ap._actions if a.option_strings and a.option_strings[0] != "-h"
            and a.option_strings[0] not in NOT_SHARED}


SHARED = {"--results", "--overwrite", "--trt", "--trtexec", "--polygraphy", "--imgsz", "--warmup-ms", "--duration",
          "--calib-dir", "--eval-dir", "--calib-images", "--level", "--profiles", "--eval-limit", "--cuda-graphs",
          "--compare-images", "--model"}


def parsers_of(verb: str, monkeypatch, capsys) -> tuple[list[argparse.ArgumentParser], str]:
    """The parsers `python -m tools.<verb> --help` builds (its subcommands' too), and what it printed."""
    seen = []
    parse = argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        seen.append(self)
        return parse(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    module = importlib.import_module(f"tools.{verb}")
    try:
        module.main(["--help"])  # trtexec_py prints its own usage and returns
    except SystemExit as e:
        assert e.code in (0, None)
    subs = [p for ap in seen for a in ap._actions if isinstance(a, argparse._SubParsersAction)
            for p in a.choices.values()]
    return seen + subs, capsys.readouterr().out


def test_the_shared_flags_are_the_ones_tools_core_spells():
    assert SHARED == set(canonical())  # a flag added to the groups is checked here too


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_answers_help_with_the_shared_flags(verb, monkeypatch, capsys):
    want = canonical()
    parsers, out = parsers_of(verb, monkeypatch, capsys)
    assert "usage" in out.lower(), out
    for ap in parsers:
        for action in ap._actions:
            flag = next((f for f in action.option_strings if f in SHARED), None)
            if flag is None or (ap.prog, flag) in OWN_MEANING:
                continue
            ref = want[flag]
            for field in ("default", "type", "choices", "required", "nargs", "const"):
                assert getattr(action, field) == getattr(ref, field), f"tools.{verb} {flag}: {field} differs"
            if flag != "--imgsz":  # the image size says what it sizes in each verb
                assert action.help == ref.help, f"tools.{verb} {flag}: help differs from tools/core/cli.py"


def test_the_help_check_sees_the_flags(monkeypatch, capsys):
    """The check above would pass on a verb with no flags: it must find them where they are."""
    parsers, out = parsers_of("pipeline", monkeypatch, capsys)
    flags = {f for ap in parsers for a in ap._actions for f in a.option_strings}
    assert SHARED - {"--imgsz"} <= flags and "--trt" in out
    parsers, _ = parsers_of("report", monkeypatch, capsys)  # its --model is another, and the check must see it
    assert any("--model" in a.option_strings and a.default == "yolo11n" for ap in parsers for a in ap._actions)
    parsers, _ = parsers_of("records", monkeypatch, capsys)
    assert any("--results" in a.option_strings for ap in parsers[1:] for a in ap._actions)  # `clean`'s


def takes_trt(verb: str, monkeypatch, capsys) -> bool:
    parsers, _ = parsers_of(verb, monkeypatch, capsys)
    return any("--trt" in a.option_strings for ap in parsers for a in ap._actions)


def test_trt_version_reaches_every_verb_that_takes_it(monkeypatch, capsys):
    targets = set(re.findall(r"^([a-z0-9-]+):.*?##", (REPO / "Makefile").read_text(), re.M)) - {"help", "test"}
    checked = set()
    for target in sorted(targets):
        res = subprocess.run(["make", "-n", "-s", target, "TRT_VERSION=11.2", f"PY={sys.executable}"], cwd=REPO,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        for command in res.stdout.replace("\\\n", " ").splitlines():
            m = re.search(r"-m tools\.(\w+)", command)
            if m and m.group(1) in VERBS and takes_trt(m.group(1), monkeypatch, capsys):
                assert "--trt 11.2" in command, f"make {target}: {command}"
                checked.add(m.group(1))
    assert {"pipeline", "sensitivity", "sweep", "summary", "predict", "e2e"} <= checked
