"""``p2pser data``: inspect a corpus folder and write the built-in synthetic corpus."""

from __future__ import annotations

import argparse
import json

from p2pser.audio import corpora, synth


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect corpora; write the synthetic corpus")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True

    info = actions.add_parser("info", help="files, speakers, emotions and durations of a corpus")
    info.add_argument("path", help="corpus folder (RAVDESS, EmoDB, CREMA-D, TESS, SAVEE) or manifest .csv/.tsv")
    info.add_argument("--layout", choices=corpora.LAYOUTS, default="auto",
                      help="force a corpus naming convention or the manifest (default: detect)")
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    info.set_defaults(func=_info)

    gen = actions.add_parser("synth", help="write the built-in synthetic emotional speech corpus")
    gen.add_argument("out_dir", help="folder to write (created; must be empty or an earlier synth output)")
    gen.add_argument("--speakers", type=int, default=synth.DEFAULT_SPEAKERS, help="number of speakers")
    gen.add_argument("--per-emotion", type=int, default=synth.DEFAULT_PER_EMOTION,
                     help="utterances per speaker and emotion")
    gen.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    gen.add_argument("--sample-rate", type=int, default=synth.DEFAULT_SAMPLE_RATE, help="Hz")
    gen.set_defaults(func=_synth)


def _info(args: argparse.Namespace) -> int:
    desc = corpora.describe(corpora.load_corpus(args.path, layout=args.layout))
    print(json.dumps(desc, indent=2) if args.json else corpora.format_description(desc))
    return 0


def _synth(args: argparse.Namespace) -> int:
    corpus = synth.synthesize_corpus(args.out_dir, speakers=args.speakers, per_emotion=args.per_emotion,
                                     seed=args.seed, sample_rate=args.sample_rate)
    print(f"wrote {len(corpus.utterances)} files, {len(corpus.speakers())} speakers to {corpus.root}")
    return 0
