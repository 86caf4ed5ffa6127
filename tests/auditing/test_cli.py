"""``privgrad audit``: registered, JSON and text output, exit status, bad input."""

from __future__ import annotations

import json
import re

import pytest

from privgrad import cli

SMALL = ["--canaries", "200", "--steps", "40", "--simulations", "200", "--no-progress"]


@pytest.fixture
def run(monkeypatch, capsys):
    """The real ``privgrad`` entry point with only the audit subcommand registered."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"audit": cli.SUBCOMMANDS["audit"]})

    def _run(*argv):
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def test_audit_is_registered():
    assert cli.SUBCOMMANDS["audit"][0] == "privgrad.cli.audit"


def test_json_report(run):
    code, out, _ = run("audit", *SMALL, "--epsilon", "4", "--json")
    data = json.loads(out)
    assert code == (0 if data["verdict"] == "consistent" else 1)
    assert data["verdict"] == "consistent"
    assert data["settings"]["num_canaries"] == 200 and data["settings"]["steps"] == 40
    assert 0 < data["accountant_epsilon"] <= 4.0
    assert data["lower_bound"] <= data["accountant_epsilon"]


def test_text_report_on_breast_cancer(run):
    code, out, _ = run("audit", *SMALL, "--dataset", "breast_cancer", "--epsilon", "8")
    assert code == 0
    assert out.startswith("privgrad audit: one-run canary audit")
    assert "verdict: consistent" in out and "ceiling" in out


def test_fixed_guesses_are_used_for_both_bounds(run):
    code, out, _ = run("audit", *SMALL, "--epsilon", "4", "--guesses", "20", "--json")
    data = json.loads(out)
    assert data["guesses"] == [20, 20] and data["fdp"]["guesses"] == [20, 20]
    assert data["fdp"]["lower_bound"] <= data["accountant_epsilon"]


def test_black_box_json_report(run):
    code, out, _ = run("audit", *SMALL, "--black-box", "--epsilon", "4", "--json")
    data = json.loads(out)
    assert code == 0 and data["verdict"] == "consistent"
    assert data["canary_kind"] == "black-box input" and data["band"] is None
    assert data["tests"] == [] and data["settings"]["steps"] == 40
    assert data["lower_bound"] <= data["accountant_epsilon"] <= 4.0


@pytest.mark.parametrize("argv,match", [
    (["--epsilon", "-1"], "epsilon must be > 0 and finite; got epsilon=-1.0"),
    (["--black-box", "--dataset", "breast_cancer", "--no-progress"],
     r"num_canaries must be < len\(records\) = 569; got num_canaries=1000"),
    (["--canaries", "0"], "num_canaries must be >= 1; got num_canaries=0"),
    (["--sample-rate", "1.5"], r"sample_rate must be in \(0, 1\]; got sample_rate=1.5"),
    (["--canaries", "100", "--guesses", "51"],
     r"2 \* guesses must be <= the number of canaries \(100\); got guesses=51\. Pass at most 50"),
])
def test_bad_input_exits_2(run, argv, match):
    code, out, err = run("audit", *argv)
    assert code == 2 and out == ""
    assert err.startswith("privgrad audit: error: ")
    assert re.search(match, err), err
