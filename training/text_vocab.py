"""Build the frozen conditioning text encoder for your captions: a SentencePiece vocabulary trained
on them and a small T5 encoder, saved in transformers format (tokenizer files + safetensors).

No pretrained T5 can be downloaded here. The encoder stays frozen at its random initialisation (as
a pretrained T5 stays frozen in the paper); DREAM's trainable aligner learns to read it. What it can
read is fixed by this vocabulary: build it from the captions the model trains on. The default
"unigram" vocabulary spells a word it never saw in known pieces instead of mapping it to <unk>;
"word" keeps every word whole (a small closed world such as the Shapes World).

    python -m training.text_vocab --out runs/mine/text --captions my_captions.txt
    python -m training.text_vocab --out runs/mine/text --data folder --data-path my_images/
    python -m training.text_vocab --out runs/emoji/text --data emoji --data-path runs/emoji-data

Then train with `t5_path=runs/mine/text` and `model.t5_max_length` at least the longest caption's
token count, which this command prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dream_core.text import build_t5_from_scratch
from training.recipes import FILE_DATA_KINDS, TrainRecipe


def corpus_of(data: str, data_path: str) -> list[str]:
    """Every caption of a file source, as the trainer would read it."""
    from training.data.sources import CorruptSample, open_source

    source = open_source(TrainRecipe(data=data, data_path=data_path).validate(), verify=False)
    if hasattr(source, "captions"):  # image folders and the emoji set read their captions alone
        return source.captions()
    out = []
    for i in range(len(source)):
        try:
            out.append(source.read(i)[1])
        except CorruptSample:
            continue
    return out


def token_lengths(text_dir: Path, corpus: list[str]) -> list[int]:
    """Tokens per caption (with the end-of-sequence token), as the conditioning encoder counts them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)
    return [len(ids) for ids in tok(corpus)["input_ids"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--captions", type=Path, default=None, help="a text file, one caption per line")
    ap.add_argument("--data", choices=FILE_DATA_KINDS, default=None, help="read the captions of a training source")
    ap.add_argument("--data-path", default="", help="with --data: the image folder, shard folder or emoji set")
    ap.add_argument("--vocab-size", type=int, default=4000, help="pieces of a unigram vocabulary (word: at least)")
    ap.add_argument("--model-type", choices=("unigram", "word"), default="unigram")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if (args.captions is None) == (args.data is None):
        ap.error("give the captions as --captions FILE or as --data KIND --data-path PATH (one of them)")
    if args.captions is not None:
        if not args.captions.is_file():
            ap.error(f"--captions file {args.captions} does not exist")
        corpus = [line.strip() for line in args.captions.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        if not args.data_path:
            ap.error(f"--data {args.data} needs --data-path")
        try:
            corpus = corpus_of(args.data, args.data_path)
        except ValueError as err:
            ap.error(str(err))
    if not corpus:
        ap.error("no captions found: the vocabulary needs at least one")
    if args.vocab_size < 4 or args.d_model % args.heads:
        ap.error("--vocab-size must be >= 4 and --d-model a multiple of --heads")
    build_t5_from_scratch(args.out, corpus, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                          d_ff=args.d_ff, vocab_size=args.vocab_size, seed=args.seed, model_type=args.model_type)
    lengths = sorted(token_lengths(args.out, corpus))
    print(json.dumps({"out": str(args.out), "captions": len(corpus), "distinct": len(set(corpus)),
                      "tokens_longest": lengths[-1], "tokens_p99": lengths[int(0.99 * (len(lengths) - 1))]}))


if __name__ == "__main__":
    main()
