"""``p2pser audit``: the attack beats chance on undefended synthetic speech, and refuses what it cannot attack."""

from __future__ import annotations

import json

import pytest

from p2pser.audio.synth import synthesize_corpus
from p2pser.cli import main
from p2pser.errors import UserError
from p2pser.experiments.audit import audit_run

RUN = ["--topology", "complete", "--model", "svm", "--features", "mfcc", "--rounds", "8", "--final-mixing", "0",
       "--local-steps", "2", "--max-seconds", "1.5", "--eval-every", "8"]


@pytest.fixture(scope="module")
def shadow(tmp_path_factory):
    """The attacker's own corpus: other synthetic speakers (another seed), both sexes."""
    root = tmp_path_factory.mktemp("shadow")
    synthesize_corpus(root, speakers=8, per_emotion=5, seed=11)
    return root


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """An undefended run whose peers recorded their updates: 10 synthetic speakers, F and M alternating, where
    sex is easy to hear (pitch and formants)."""
    corpus = tmp_path_factory.mktemp("target-corpus")
    synthesize_corpus(corpus, speakers=10, per_emotion=5, seed=3)
    out = tmp_path_factory.mktemp("target") / "run"
    assert main(["simulate", str(corpus), *RUN, "--record-updates", "first-layer", "--out", str(out)]) == 0
    return corpus, out


@pytest.mark.slow  # four simulations of 8 rounds and the attack: about 20 s of CPU
def test_audit_beats_chance_on_undefended_synthetic_speech(target, shadow, capsys):
    _, run = target
    assert main(["audit", str(run), "--shadow", str(shadow), "--shadow-folds", "2", "--bootstrap", "300"]) == 0
    audit = json.loads((run / "audit.json").read_text())
    assert audit["chance"] == 0.5 and audit["dp_mode"] == "none" and audit["dp_epsilon"] is None
    assert audit["peers_attacked"] >= 6 and audit["shadow_corpus"] == str(shadow)
    assert set(audit["attack_uar_per_round"]) == {str(r) for r in range(8)}
    assert audit["ci_low"] <= audit["attack_uar"] <= audit["ci_high"]
    assert audit["ci_low"] > 0.5, audit  # better than chance with 95% confidence
    assert (run / "audit.png").stat().st_size > 0
    assert "attack UAR" in capsys.readouterr().out


def test_audit_refuses_a_run_without_recorded_updates(target, shadow, tmp_path, capsys):
    corpus, _ = target
    plain = tmp_path / "plain"
    assert main(["simulate", str(corpus), *RUN, "--rounds", "2", "--out", str(plain)]) == 0
    assert main(["audit", str(plain), "--shadow", str(shadow)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--record-updates first-layer" in err


def test_audit_refuses_what_is_not_a_run_or_the_run_own_corpus(target, shadow, tmp_path):
    corpus, run = target
    with pytest.raises(UserError, match="not a run folder"):
        audit_run(tmp_path, shadow)
    with pytest.raises(UserError, match="does not exist"):
        audit_run(tmp_path / "missing", shadow)
    with pytest.raises(UserError, match="the run's own corpus"):
        audit_run(run, corpus)
