"""What the model reads: sources, tokenizers, prepared token files, and the loader.

    corpus.py       the token streams a run reads: the built-in corpus, text, .bin, prepared folders
    loader.py       the deterministic, resumable loader that gives each dp rank its rows
    options.py      `--data`, `--tokenizer`, batch sizes, sequence length, and their checks
    tokenizer.py    tokenizer.json through the `tokenizers` package; training a byte-level BPE
    documents.py    documents from text, folders, JSON Lines, Parquet and saved datasets
    token_files.py  the prepared format: token files, document offsets, a header
    megatron.py     Megatron-LM's indexed datasets (.bin/.idx), read as one stream
    prepare.py      `meshpar prepare-data`: tokenize in worker processes, publish atomically
    commands.py     the `prepare-data` and `tokenizer` commands
"""
