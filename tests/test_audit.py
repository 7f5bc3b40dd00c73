"""``p2pser audit``: the attack beats chance on undefended synthetic speech, and refuses what it cannot attack."""

from __future__ import annotations

import json

import pytest

from p2pser.audio.synth import synthesize_corpus
from p2pser.cli import main
from p2pser.errors import UserError
from p2pser.experiments.audit import audit_run, default_shadow, read_traces

# The default model and features (mlp on ComParE functionals), a short schedule.
RUN = ["--topology", "complete", "--rounds", "8", "--final-mixing", "0", "--local-steps", "2", "--max-seconds", "1.5",
       "--eval-every", "8"]
# What the refusals need is any run: the linear model on MFCCs takes seconds.
CHEAP = [*RUN, "--model", "svm", "--features", "mfcc", "--rounds", "2"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """One data root with two synthetic corpora of different voices (other seeds), both sexes: the target's
    and the attacker's."""
    root = tmp_path_factory.mktemp("data")
    synthesize_corpus(root / "target", speakers=10, per_emotion=5, seed=3)
    synthesize_corpus(root / "shadow", speakers=8, per_emotion=5, seed=11)
    return root / "target", root / "shadow"


@pytest.fixture(scope="module")
def cheap(corpora, tmp_path_factory):
    out = tmp_path_factory.mktemp("cheap") / "run"
    assert main(["simulate", str(corpora[0]), *CHEAP, "--record-updates", "first-layer", "--out", str(out)]) == 0
    return out


@pytest.mark.slow  # three simulations of the default mlp on ComParE and the attack: about 40 s of CPU
def test_audit_beats_chance_on_undefended_synthetic_speech(corpora, tmp_path, capsys):
    """10 synthetic speakers, F and M alternating, where sex is easy to hear (pitch and formants): an
    undefended run's updates give it away; the shadow corpus is found beside the target's."""
    target, shadow = corpora
    run = tmp_path / "run"
    assert main(["simulate", str(target), *RUN, "--record-updates", "first-layer", "--out", str(run)]) == 0
    assert main(["audit", str(run), "--shadow-folds", "2", "--bootstrap", "300"]) == 0
    audit = json.loads((run / "audit.json").read_text())
    assert audit["chance"] == 0.5 and audit["dp_mode"] == "none" and audit["dp_epsilon"] is None
    assert audit["peers_attacked"] >= 6 and audit["shadow_corpus"] == str(shadow)
    assert audit["attribute"] == "sex" and audit["attributes"]["sex"]["attack_uar"] == audit["attack_uar"]
    assert set(audit["attack_uar_per_round"]) == {str(r) for r in range(8)}
    assert audit["ci_low"] <= audit["attack_uar"] <= audit["ci_high"]
    assert audit["ci_low"] > 0.5, audit  # better than chance with 95% confidence
    assert (run / "audit.png").stat().st_size > 0
    assert "attack UAR" in capsys.readouterr().out


def test_audit_refuses_a_run_without_recorded_updates(corpora, tmp_path, capsys):
    target, shadow = corpora
    plain = tmp_path / "plain"
    assert main(["simulate", str(target), *CHEAP, "--out", str(plain)]) == 0
    assert main(["audit", str(plain), "--shadow", str(shadow)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--record-updates first-layer" in err


def test_audit_refuses_what_is_not_a_run_or_the_run_own_corpus(corpora, cheap, tmp_path):
    target, shadow = corpora
    with pytest.raises(UserError, match="not a run folder"):
        audit_run(tmp_path, shadow)
    with pytest.raises(UserError, match="does not exist"):
        audit_run(tmp_path / "missing", shadow)
    with pytest.raises(UserError, match="the run's own corpus"):
        audit_run(cheap, target)
    with pytest.raises(UserError, match="no peer holds speakers of one known age"):
        audit_run(cheap, shadow, attribute="age")  # synthetic speakers have no age


def test_default_shadow_is_another_corpus_beside_the_run(corpora, cheap, tmp_path, monkeypatch):
    _, shadow = corpora
    monkeypatch.delenv("P2PSER_SHARED_DATA", raising=False)
    _, meta = read_traces(cheap, what="run")
    assert default_shadow(meta, cheap) == shadow
    alone = tmp_path / "alone"
    alone.mkdir()
    meta["data_dir"] = str(alone / "target")
    with pytest.raises(UserError, match="pass one with --shadow DIR"):
        default_shadow(meta, cheap)
    monkeypatch.setenv("P2PSER_SHARED_DATA", str(shadow.parent))
    assert default_shadow(meta, cheap) == shadow
