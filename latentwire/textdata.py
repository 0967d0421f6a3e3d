"""English text that ships with Python itself (pydoc topics): the offline corpus for calibration,
tiny tokenizers and trajectory collection. No download, identical on every machine."""

from __future__ import annotations

from collections.abc import Iterator


def offline_corpus(max_chars: int | None = None) -> Iterator[str]:
    from pydoc_data.topics import topics

    total = 0
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if len(para) < 40:
                continue
            yield para
            total += len(para)
            if max_chars is not None and total >= max_chars:
                return


def text_chunks(n: int, min_chars: int = 200, skip: int = 0) -> list[str]:
    """n paragraphs-joined chunks of at least min_chars characters, in a fixed order."""
    out, buf = [], ""
    for i, para in enumerate(offline_corpus()):
        if i < skip:
            continue
        buf = f"{buf} {para}".strip()
        if len(buf) >= min_chars:
            out.append(buf)
            buf = ""
            if len(out) == n:
                break
    return out
