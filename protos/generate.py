"""Regenerate the committed *_pb2 modules: `python -m protos.generate` (tests check they are current)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos" / "latentwire" / "v1").glob("*.proto"))


def generate(out_dir: Path = ROOT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}"] + [str(p.relative_to(ROOT)) for p in PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "protos" / "latentwire" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for p in generate():
        print(p.relative_to(ROOT))
    sys.exit(0)
