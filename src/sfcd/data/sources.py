"""Documents from sources other than the built-in grammar: local .txt / .jsonl files and HF ``datasets``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from sfcd.errors import ConfigError, InputError, OfflineError


def text_file_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a ``.txt`` file (separated by blank lines) or a ``.jsonl`` file (``text_field`` of each row)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"corpus file {path} does not exist; set corpus.path to a .txt or .jsonl file")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise InputError(
                        f"{path}, line {lineno}: expected an object with a string {text_field!r} field "
                        f"(set corpus.text_field to the right column)"
                    )
                if row[text_field].strip():
                    yield row[text_field]
    elif path.suffix == ".txt":
        doc: list[str] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    doc.append(line.rstrip("\n"))
                elif doc:
                    yield "\n".join(doc)
                    doc = []
        if doc:
            yield "\n".join(doc)
    else:
        raise InputError(f"corpus file {path} has suffix {path.suffix!r}; expected .txt or .jsonl")


def hf_documents(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    """Stream the ``text_field`` of a Hugging Face dataset (needs the network unless the dataset is cached)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("corpus=hf needs the `datasets` package: pip install 'sfcd[hf]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for row in ds:
            if text_field not in row:
                raise ConfigError(f"dataset {name} has no column {text_field!r}; its columns are {sorted(row)}")
            if row[text_field].strip():
                yield row[text_field]
    except (ConfigError, InputError):
        raise
    except Exception as e:  # datasets raises many types when the hub cannot be reached
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise OfflineError(
            f"could not stream dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"A hub dataset needs the network{' (HF offline mode is set)' if offline else ''}; "
            "offline, use corpus=text corpus.path=<a local .txt or .jsonl file>"
        ) from None
