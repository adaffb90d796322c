"""Text in and out: the GGUF file's tokenizer (byte-level BPE and SentencePiece-style, checked
against llama.cpp's ids), detokenization (whole and incremental), chat templates and prompt
files."""
