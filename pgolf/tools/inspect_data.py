"""Summaries of the data stages' files: corpus JSONL, tokenizer model, token shards.

Every file is read through the loader its stage uses (``pgolf.data.corpus``,
``pgolf.data.tokenizer``, ``pgolf.data.shards``), so inspect accepts and refuses
exactly what the pipeline does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pgolf.data.corpus import iter_jsonl
from pgolf.errors import DataError
from pgolf.tools.inspect_summary import InspectOptions, Summary, fmt, preview
from pgolf.data.shards import BOS_ID, HEADER_BYTES, MAGIC, VERSION, read_header, read_shard
from pgolf.data.tokenizer import check_layout, load_processor, sha256_bytes

# Shards are scanned in slices of this many tokens, so a 100M-token file
# never has to sit in memory at once.
_SCAN_TOKENS = 1 << 24
BOS_MARK = "<s>"


def summarise_corpus(path: Path) -> Summary:
    """Document count, UTF-8 text bytes, length range and the first document's start."""
    docs = text_bytes = 0
    shortest: int | None = None
    longest = 0
    first = ""
    for text in iter_jsonl(path):
        size = len(text.encode("utf-8"))
        if docs == 0:
            first = text
        docs += 1
        text_bytes += size
        shortest = size if shortest is None else min(shortest, size)
        longest = max(longest, size)
    if docs == 0:
        raise DataError(f"{path}: no documents")
    facts = {"documents": docs, "text_bytes": text_bytes, "file_bytes": path.stat().st_size,
             "doc_bytes_min": shortest, "doc_bytes_max": longest,
             "doc_bytes_mean": text_bytes / docs, "first_doc_preview": first[:200]}
    lines = [f"documents: {fmt(docs)}, text {fmt(text_bytes)} bytes (file {fmt(facts['file_bytes'])} bytes)",
             f"document bytes: min {fmt(shortest)}, mean {facts['doc_bytes_mean']:,.0f}, max {fmt(longest)}",
             f"first document: {preview(first)}"]
    return Summary("corpus_jsonl", str(path), facts, lines)


def summarise_tokenizer(path: Path) -> Summary:
    """Vocabulary, special ids, the byte-fallback block and whether it has the challenge layout."""
    data = path.read_bytes()
    sp = load_processor(data, str(path))
    vocab = sp.vocab_size()
    byte_ids = [i for i in range(vocab) if sp.is_byte(i)]
    counts = {"control": sum(sp.is_control(i) for i in range(vocab)),
              "unknown": sum(sp.is_unknown(i) for i in range(vocab)),
              "unused": sum(sp.is_unused(i) for i in range(vocab)),
              "byte": len(byte_ids)}
    counts["normal"] = vocab - sum(counts.values())
    contiguous = bool(byte_ids) and byte_ids == list(range(byte_ids[0], byte_ids[0] + len(byte_ids)))
    try:
        check_layout(data, vocab, str(path))
        layout_problem = None
    except DataError as exc:
        layout_problem = str(exc).removeprefix(f"{path}: ")
    normal = [sp.id_to_piece(i) for i in range(vocab)
              if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))]
    longest = sorted(normal, key=lambda piece: (-len(piece), piece))[:5]
    facts = {
        "vocab_size": vocab, "sha256": sha256_bytes(data), "file_bytes": len(data),
        "special_ids": {"pad": sp.pad_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()},
        "piece_counts": counts,
        "byte_fallback": {"pieces": len(byte_ids), "first_id": byte_ids[0] if byte_ids else None,
                          "last_id": byte_ids[-1] if byte_ids else None, "contiguous": contiguous},
        "challenge_layout": layout_problem is None, "layout_problem": layout_problem,
        "longest_pieces": longest,
    }
    specials = ", ".join(f"{k} {v}" for k, v in facts["special_ids"].items())
    bf = facts["byte_fallback"]
    byte_line = (f"byte fallback: {bf['pieces']} pieces, ids {bf['first_id']}..{bf['last_id']}"
                 f"{'' if contiguous else ' (not contiguous)'}" if byte_ids else "byte fallback: none")
    lines = [f"vocab size: {fmt(vocab)} ({counts['normal']:,} normal pieces)",
             f"special ids: {specials}",
             byte_line,
             "challenge layout (0-3 specials, 4-259 <0x00>..<0xFF>): "
             + ("yes" if layout_problem is None else f"no: {layout_problem}"),
             f"longest pieces: {', '.join(repr(p) for p in longest)}",
             f"sha256: {facts['sha256']}"]
    return Summary("tokenizer", str(path), facts, lines)


def _scan(tokens: np.ndarray) -> tuple[int, int]:
    """(BOS count, largest id) of a shard body."""
    documents, top = 0, 0
    for start in range(0, tokens.size, _SCAN_TOKENS):
        chunk = tokens[start:start + _SCAN_TOKENS]
        documents += int(np.count_nonzero(chunk == BOS_ID))
        top = max(top, int(chunk.max()))
    return documents, top


def decode_ids(sp, ids: list[int]) -> str:
    """Text of ``ids`` with each BOS shown as ``<s>`` (decoding alone would drop it)."""
    parts: list[str] = []
    run: list[int] = []
    for i in ids + [BOS_ID]:
        if i == BOS_ID:
            if run:
                parts.append(sp.decode(run))
                run = []
            parts.append(BOS_MARK)
        else:
            run.append(i)
    return "".join(parts[:-1])


def _decoded_slice(path: Path, ids: list[int], options: InspectOptions) -> tuple[str | None, str | None]:
    """(text, note): the slice as text, or why it is not shown."""
    if options.tokenizer is None:
        return None, "no tokenizer (none at the default path); pass --tokenizer to decode"
    if not options.tokenizer.is_file():
        if options.tokenizer_required:
            raise DataError(f"{options.tokenizer}: tokenizer model not found")
        return None, f"no tokenizer at {options.tokenizer}"
    sp = load_processor(options.tokenizer.read_bytes(), str(options.tokenizer))
    too_big = [i for i in ids if i >= sp.vocab_size()]
    if too_big:
        return None, (f"id {too_big[0]} is outside {options.tokenizer}'s vocabulary of "
                      f"{sp.vocab_size()}; wrong tokenizer?")
    return decode_ids(sp, ids), None


def summarise_shard(path: Path, options: InspectOptions) -> Summary:
    """Header, token and document counts, and (``options``) one slice as ids and text."""
    num_tokens = read_header(path)
    tokens = read_shard(path)
    documents, top = _scan(tokens) if num_tokens else (0, 0)
    if options.offset > num_tokens:
        raise DataError(f"{path}: --offset {options.offset} is past the end of its {num_tokens:,} tokens")
    ids = [int(i) for i in tokens[options.offset:options.offset + options.count]]
    facts = {"magic": MAGIC, "version": VERSION, "num_tokens": num_tokens,
             "file_bytes": HEADER_BYTES + 2 * num_tokens, "documents": documents, "max_id": top}
    lines = [f"header: magic {MAGIC}, version {VERSION}, {num_tokens:,} tokens "
             f"({facts['file_bytes']:,} bytes with the {HEADER_BYTES}-byte header)",
             f"documents (BOS tokens): {documents:,}; largest id {top}"]
    if options.count:
        text, note = _decoded_slice(path, ids, options)
        facts["slice"] = {"offset": options.offset, "count": len(ids), "ids": ids, "text": text,
                          "tokenizer": str(options.tokenizer) if options.tokenizer else None, "note": note}
        end = options.offset + len(ids)
        lines.append(f"tokens [{options.offset:,}, {end:,}): {' '.join(map(str, ids))}")
        lines.append(f"text ({BOS_MARK} = BOS): {preview(text, 2000)}" if text is not None else f"text: {note}")
    return Summary("shard", str(path), facts, lines)
