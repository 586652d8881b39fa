"""Prepare golfjax data: tokenize documents into shards, train a tokenizer, or download FineWeb.

  python scripts/prepare_data.py text docs.jsonl --tokenizer tok.model --out data/mine --num-val-docs 20
  python scripts/prepare_data.py tokenizer docs.jsonl --vocab-size 1024 --out-prefix data/tokenizers/mine_1024_bpe
  python scripts/prepare_data.py fineweb --variant sp1024 --train-shards 10 --out data
  python scripts/prepare_data.py cpu-track --shared ../shared/data --out data/cpu_track
  python scripts/prepare_data.py caseops-tokenizer docs.jsonl --vocab-size 8192 --out-prefix data/tokenizers/mine_caseops
  python scripts/prepare_data.py caseops docs.jsonl --tokenizer data/tokenizers/mine_caseops.model --out data/mine_caseops --num-val-docs 20
"""

from __future__ import annotations

import argparse
import os
import sys

from golfjax.data import prepare
from golfjax.data.shards import ShardError
from golfjax.data.tokenizer import SPACE_PIECE, TokenizerError, load_tokenizer


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help=".jsonl ({\"text\": ...} per line) or .txt files, in order")
    p.add_argument(
        "--txt-split",
        choices=prepare.TXT_SPLITS,
        default="document",
        help="how a .txt file becomes documents: the whole file, one per line, or one per paragraph",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    text = sub.add_parser("text", help="tokenize documents into fineweb_{val,train}_*.bin shards")
    _add_inputs(text)
    text.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    text.add_argument("--out", required=True, help="output directory for the shards")
    text.add_argument(
        "--num-val-docs",
        type=int,
        required=True,
        help=f"the first N documents form the validation split (the challenge uses {prepare.NUM_VAL_DOCS})",
    )
    text.add_argument("--shard-size", type=int, default=prepare.SHARD_SIZE, help="tokens per shard")
    text.add_argument("--vocab-size", type=int, default=None, help="refuse a tokenizer of another size")
    text.add_argument("--quiet", action="store_true", help="no progress bar")

    tok = sub.add_parser("tokenizer", help="train a SentencePiece BPE with the challenge exporter's settings")
    _add_inputs(tok)
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--out-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    tok.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    tok.add_argument(
        "--max-sentence-length",
        type=int,
        default=None,
        help=f"longest document (bytes) used; default SentencePiece's {prepare.SP_DEFAULT_MAX_SENTENCE_LENGTH}, "
        "as the exporter",
    )
    tok.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")

    fw = sub.add_parser("fineweb", help="download the published challenge export from Hugging Face")
    fw.add_argument("--variant", default="sp1024", help="byte260 or sp<VOCAB_SIZE> (default sp1024)")
    fw.add_argument("--train-shards", type=int, default=80, help="training shards to fetch (default 80)")
    fw.add_argument("--out", default="data", help="local root: writes datasets/, tokenizers/, manifest.json")
    fw.add_argument(
        "--repo-id",
        default=os.environ.get("MATCHED_FINEWEB_REPO_ID", prepare.HF_REPO_ID),
        help="Hugging Face dataset repo (env MATCHED_FINEWEB_REPO_ID; default %(default)s)",
    )
    fw.add_argument(
        "--remote-root",
        default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", prepare.HF_REMOTE_ROOT),
        help="folder of the export inside the repo (env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX; default %(default)s)",
    )
    fw.add_argument("--manifest", default=None, help="use this local manifest.json instead of the repo's")
    fw.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl and its sidecar")
    fw.add_argument("--quiet", action="store_true", help="no progress bar")

    cpu = sub.add_parser(
        "cpu-track",
        help="build the CPU golf track (docs/CPU_TRACK.md) from the shared data; refuses other inputs",
    )
    cpu.add_argument(
        "--shared",
        default=os.environ.get("GOLFJAX_SHARED", "../shared"),
        help="the shared data folder holding tokenizers/, fineweb/, text/ (or its parent); "
        "default $GOLFJAX_SHARED or ../shared",
    )
    cpu.add_argument("--out", default="data/cpu_track", help="output directory (default %(default)s)")
    cpu.add_argument("--threads", type=int, default=None, help="SentencePiece encoding threads (default: all cores)")
    cpu.add_argument("--quiet", action="store_true", help="no progress bar")

    cot = sub.add_parser(
        "caseops-tokenizer",
        help="train a SentencePiece BPE on the CaseOps transform of the documents, operators reserved",
    )
    _add_inputs(cot)
    cot.add_argument("--vocab-size", type=int, required=True)
    cot.add_argument("--out-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    cot.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    cot.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")

    co = sub.add_parser(
        "caseops",
        help="CaseOps shards: transformed tokens plus the validation byte sidecar fineweb_val_bytes_*.bin",
    )
    _add_inputs(co)
    co.add_argument("--tokenizer", required=True, help="a CaseOps SentencePiece .model (caseops-tokenizer)")
    co.add_argument("--out", required=True, help="output directory for the shards")
    co.add_argument("--num-val-docs", type=int, required=True,
                    help=f"the first N documents form the validation split (the challenge uses {prepare.NUM_VAL_DOCS})")
    co.add_argument("--shard-size", type=int, default=prepare.SHARD_SIZE, help="tokens per shard")
    co.add_argument("--vocab-size", type=int, default=None, help="refuse a tokenizer of another size")
    co.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_caseops_tokenizer(args: argparse.Namespace) -> None:
    docs = prepare.read_documents(args.inputs, args.txt_split)
    model = prepare.train_caseops_tokenizer(docs, args.vocab_size, args.out_prefix,
                                            max_docs=args.max_docs, verbose=args.verbose)
    sp = load_tokenizer(model, args.vocab_size)
    from golfjax.data import caseops
    ids = ", ".join(f"U+{ord(op):04X}={sp.piece_to_id(op)}" for op in caseops.OPERATORS)
    print(f"wrote {model} (vocab_size {sp.vocab_size()}, operators {ids})")


def run_caseops(args: argparse.Namespace) -> None:
    sp = load_tokenizer(args.tokenizer, args.vocab_size)
    docs = prepare.read_documents(args.inputs, args.txt_split)
    summary = prepare.tokenize_caseops_to_shards(docs, sp, args.out, args.num_val_docs, args.shard_size,
                                                 progress=not args.quiet)
    print(
        f"wrote CaseOps shards to {summary['out_dir']}: val {summary['docs_val']} docs / "
        f"{summary['tokens_val']:,} tokens / {summary['bytes_val']:,} original bytes "
        f"({summary['files_val']} token + {summary['files_val_bytes']} sidecar file(s)), "
        f"train {summary['docs_train']} docs / {summary['tokens_train']:,} tokens"
    )
    print("evaluate with --set caseops.caseops_enabled=true --set data.val_pattern='fineweb_val_[0-9]*.bin'")


def run_text(args: argparse.Namespace) -> None:
    sp = load_tokenizer(args.tokenizer, args.vocab_size)
    docs = prepare.read_documents(args.inputs, args.txt_split)
    summary = prepare.tokenize_documents_to_shards(
        docs, sp, args.out, args.num_val_docs, args.shard_size, progress=not args.quiet
    )
    print(
        f"wrote {summary['files_total']} shard(s) to {summary['out_dir']}: "
        f"val {summary['docs_val']} docs / {summary['tokens_val']:,} tokens in {summary['files_val']} file(s), "
        f"train {summary['docs_train']} docs / {summary['tokens_train']:,} tokens in {summary['files_train']} file(s)"
    )
    if summary["removed_stale_shards"]:
        print(f"removed {summary['removed_stale_shards']} shard(s) of a previous export")


def run_tokenizer(args: argparse.Namespace) -> None:
    docs = list(prepare.read_documents(args.inputs, args.txt_split))
    limit = args.max_sentence_length or prepare.SP_DEFAULT_MAX_SENTENCE_LENGTH
    texts = list(prepare.training_text(docs, args.max_docs))
    too_long = sum(len(t.encode("utf-8")) > limit for t in texts)
    model = prepare.train_tokenizer(
        docs,
        args.vocab_size,
        args.out_prefix,
        max_docs=args.max_docs,
        max_sentence_length=args.max_sentence_length,
        verbose=args.verbose,
    )
    sp = load_tokenizer(model, args.vocab_size)
    print(f"wrote {model} (vocab_size {sp.vocab_size()}, '{SPACE_PIECE}' id {sp.piece_to_id(SPACE_PIECE)})")
    print(f"trained on {len(texts) - too_long} of {len(texts)} documents")
    if too_long:
        print(
            f"note: {too_long} document(s) longer than {limit} bytes were skipped by SentencePiece, as in the "
            "reference exporter (raise --max-sentence-length or use --txt-split to keep them)"
        )


def run_fineweb(args: argparse.Namespace) -> None:
    summary = prepare.download_fineweb(
        args.variant,
        args.train_shards,
        args.out,
        repo_id=args.repo_id,
        remote_root=args.remote_root,
        manifest_path=args.manifest,
        with_docs=args.with_docs,
        progress=not args.quiet,
    )
    print(
        f"{summary['files']} file(s) in place ({summary['downloaded']} downloaded, "
        f"{summary['already_present']} already present); shards in {summary['dataset_dir']}"
    )


def run_cpu_track(args: argparse.Namespace) -> None:
    summary = prepare.build_cpu_track(args.shared, args.out, num_threads=args.threads, progress=not args.quiet)
    print(
        f"built the CPU track in {summary['out_dir']}: "
        f"val {summary['docs_val']} docs / {summary['tokens_val']:,} tokens, "
        f"train {summary['docs_train']} docs / {summary['tokens_train']:,} tokens"
    )
    for name, sha in summary["sha256"].items():
        print(f"  {name} sha256 {sha} (matches the track)")
    print(f"  tokenizer {summary['tokenizer_path']}; manifest {summary['manifest']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"text": run_text, "tokenizer": run_tokenizer, "fineweb": run_fineweb, "cpu-track": run_cpu_track,
                "caseops-tokenizer": run_caseops_tokenizer, "caseops": run_caseops}
    try:
        commands[args.command](args)
    except (prepare.PrepareError, TokenizerError, ShardError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
