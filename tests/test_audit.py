"""``p2pser audit``: the attack beats chance on undefended synthetic speech, and refuses what it cannot attack."""

from __future__ import annotations

import json

import numpy as np
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


def _traces(rng, bases, ages, rounds=3, outputs=6):
    """Updates of one peer per age whose rows move along one of two input-space subspaces, older (> 21) or not,
    mixed by a different random matrix every time (the hidden units of another round or run)."""
    from p2pser.experiments.audit import Traces, describe_update

    inputs = bases[0].shape[0]
    parts = {"per_input": [], "whole": [], "subspace": [], "peer": [], "round": [], "speaker": [], "attributes": []}
    for peer, age in enumerate(ages):
        for r in range(rounds):
            update = rng.normal(size=(outputs, 3)) @ bases[int(age > 21)].T + 0.05 * rng.normal(size=(outputs, inputs))
            per_input, whole, subspace = describe_update(update)
            for key, value in (("per_input", per_input), ("whole", whole), ("subspace", subspace), ("peer", peer),
                               ("round", r), ("speaker", f"s{peer}"), ("attributes", {"age": age, "sex": None})):
                parts[key].append(value)
    return Traces(np.stack(parts["per_input"]), np.stack(parts["whole"]), np.stack(parts["subspace"]), outputs,
                  np.array(parts["peer"]), np.array(parts["round"]), np.array(parts["speaker"]), parts["attributes"])


def test_subspace_attack_reads_age_through_any_mixing_with_the_run_median_for_both_sides():
    from p2pser.experiments.audit import attack

    rng = np.random.default_rng(0)
    bases = [np.linalg.qr(rng.normal(size=(40, 3)))[0] for _ in range(2)]  # how older and younger voices differ
    # Target median 21 (ages 18..24); the shadow's own median would be 20.5 and call its 21-year-olds older.
    target = _traces(rng, bases, [18, 19, 20, 21, 21, 22, 23, 24, 24])
    shadow = _traces(rng, bases, [18, 19, 20, 20, 20, 21, 22, 23, 24, 25])
    result = attack(target, shadow, "age", bootstrap=50, seed=0)
    assert result["positive_class"] == result["shadow_positive_class"] == "older than 21"
    assert result["attack_uar"] >= 0.9 and result["ci_low"] > 0.5
    subspace = [c["cv_uar"] for c in result["candidates"] if c["classifier"] == "subspace-neighbours"]
    assert max(subspace) == 1.0
