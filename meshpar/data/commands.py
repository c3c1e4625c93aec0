"""`meshpar prepare-data` and `meshpar tokenizer train`: every problem a user can cause is
one message and exit code 2, before any tokenizing starts where it can be known then."""

from __future__ import annotations

import sys
import time

INPUT_HELP = ("text files (one document each), folders of them, .jsonl, .parquet, or a dataset saved with "
              "the `datasets` library's save_to_disk")


def add_prepare_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    parser.add_argument("--tokenizer", required=True, metavar="TOK",
                        help="a tokenizer.json, or a folder holding one (a transformers model directory)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (published whole when done)")
    parser.add_argument("--text-field", default="text", help="the field or column holding the text (default text)")
    parser.add_argument("--split", help="the split of a saved DatasetDict (default train)")
    parser.add_argument("--val-every", type=int, default=20, metavar="K",
                        help="every K-th document goes to the validation split (default 20: 5%%; 0: none)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="tokenizing processes (default 2; 1 tokenizes in this process)")
    parser.add_argument("--eot", metavar="TOKEN", help="the token that ends each document (default: the "
                                                       "tokenizer's eos_token or <|endoftext|>-like token)")
    parser.add_argument("--force", action="store_true", help="replace --out if it holds anything")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_tokenizer_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train a byte-level BPE tokenizer on local text",
                               description="Train a byte-level BPE (the 256 bytes, merges, and <|endoftext|>) "
                                           "and write OUT/tokenizer.json, which prepare-data, the tokenizers "
                                           "package and transformers' AutoTokenizer read.")
    train.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    train.add_argument("--vocab-size", type=int, required=True, metavar="N", help="ids in all, at least 257")
    train.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    train.add_argument("--text-field", default="text", help="the field or column holding the text (default text)")
    train.add_argument("--split", help="the split of a saved DatasetDict (default train)")
    train.add_argument("--min-frequency", type=int, default=2, metavar="N",
                       help="merge only pairs seen at least N times (default 2)")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _fail(command: str, err: Exception) -> int:
    print(f"meshpar {command}: {err}", file=sys.stderr)
    return 2


def prepare_command(args) -> int:
    from meshpar.data.prepare import prepare_data

    started = time.perf_counter()
    try:
        data = prepare_data(args.inputs, args.tokenizer, args.out, text_field=args.text_field, split=args.split,
                            val_every=args.val_every, workers=args.workers, end_of_text=args.eot, force=args.force,
                            progress=args.progress)
    except ValueError as err:  # DocumentError, TokenizerError, PrepareError
        return _fail("prepare-data", err)
    except KeyboardInterrupt:
        print("meshpar prepare-data: interrupted; nothing was written", file=sys.stderr)
        return 130
    header, seconds = data.header, time.perf_counter() - started
    tokens = sum(s["tokens"] for s in header["splits"].values())
    split_text = ", ".join(f"{name} {s['documents']:,} documents / {s['tokens']:,} tokens"
                           for name, s in header["splits"].items())
    print(f"{args.out}: {split_text}; {header['dtype']}, vocabulary {header['vocab_size']:,}, end-of-text "
          f"{header['tokenizer']['end_of_text']!r}; {header['text_bytes'] / 1e6:.1f} MB of text in {seconds:.1f} s "
          f"({tokens / seconds:,.0f} tokens/s)")
    if header["splits"]["validation"]["documents"] == 0:
        print(f"meshpar prepare-data: note: the validation split is empty (--val-every {args.val_every}); "
              f"`meshpar train` needs one", file=sys.stderr)
    return 0


def tokenizer_command(args) -> int:
    from meshpar.data.documents import check_fields, find_sources, read_documents
    from meshpar.data.tokenizer import load_tokenizer, train_bpe

    if args.vocab_size < 257:
        return _fail("tokenizer train", ValueError(f"--vocab-size {args.vocab_size}: at least 257 (the 256 bytes "
                                                   f"and the end-of-text token)"))
    try:
        sources = find_sources(args.inputs, args.split)
        check_fields(sources, args.text_field)
        path = train_bpe(read_documents(sources, args.text_field), args.vocab_size, args.out,
                         min_frequency=args.min_frequency, progress=args.progress)
        tok = load_tokenizer(path)
    except ValueError as err:
        return _fail("tokenizer train", err)
    print(f"{path}: byte-level BPE, {tok.vocab_size:,} ids (asked {args.vocab_size:,}; fewer when the text "
          f"has fewer pairs to merge), end-of-text {tok.end_of_text!r} = {tok.end_of_text_id}")
    return 0
