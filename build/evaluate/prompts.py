"""Prompt sets for evaluation: the built-in set, a user file, or a Hub dataset.

    >>> from smash_build.evaluate.prompts import load_prompts
    >>> load_prompts("builtin", num=4)              # the project's own prompts, categories interleaved
    >>> load_prompts("my_prompts.txt")               # one prompt a line (also .json, .jsonl, .csv, .tsv)
    >>> load_prompts("hf://datasets/ORG/NAME")       # a Hub dataset's csv/tsv/json files (offline: from the cache)

The built-in prompts were written for this project (no third-party licence applies). They cover
what text-to-image evaluations usually probe: counting, colours and attribute binding,
spatial relations, text rendering, rare words, and long compositional descriptions.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from smash_runtime.errors import SettingsError, SmashError

BUILTIN = "builtin"
HF_DATASET_PREFIX = "hf://datasets/"
FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv")
# Column names the common prompt sets use (DrawBench: "Prompts", PartiPrompts: "Prompt").
_PROMPT_KEYS = ("prompt", "prompts", "text", "caption")
_CATEGORY_KEYS = ("category", "categories", "challenge")


class PromptSetError(SmashError):
    """A prompt set cannot be found, fetched or parsed."""


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str | None = None


_BUILTIN: dict[str, list[str]] = {
    "counting": [
        "three red apples on a white wooden table",
        "exactly five yellow rubber ducks floating in a bathtub",
        "two cats and one dog sleeping on a grey sofa",
        "a row of seven blue glass bottles on a windowsill",
        "four origami cranes hanging from a single thread",
        "a chessboard with only two pieces left: a white king and a black queen",
    ],
    "colours": [
        "a green bicycle leaning against a pink wall",
        "a purple umbrella next to an orange traffic cone in the rain",
        "a blue cup on a red saucer beside a yellow spoon",
        "a black and white striped lighthouse under a teal evening sky",
        "a golden fox sitting in a field of violet lavender",
    ],
    "positions": [
        "a small cube on top of a large sphere",
        "a lamp to the left of a bookshelf, a plant to the right",
        "a cat hiding underneath a wooden chair",
        "a red ball behind a transparent glass vase",
        "a bird flying above a sailboat, seen from below",
    ],
    "text": [
        'a shop sign that reads "OPEN 24 HOURS" in neon letters',
        'a birthday cake with the word "SMASH" written in blue icing',
        'a chalkboard menu listing "soup", "bread" and "tea"',
        'a vintage poster with the title "MOON EXPRESS 1969"',
        'a street sign pointing to "Elm Road" on a foggy morning',
    ],
    "rare words": [
        "an axolotl wearing a tiny crown, studio photograph",
        "a pangolin crossing a cobblestone street at dusk",
        "a zoetrope spinning on a cluttered workbench",
        "a bowl of rambutan and mangosteen on a bamboo mat",
        "a narwhal made of blown glass, macro photograph",
    ],
    "long descriptions": [
        "a cosy reading nook in a Scandinavian apartment with a knitted blanket thrown over a grey "
        "armchair, a steaming mug of tea on a small oak side table, soft afternoon light coming "
        "through a tall window, and snow falling outside",
        "an aerial view of a terraced rice field in the mountains at sunrise, mist lying in the "
        "valleys, a small farmhouse with a red roof in the lower left corner and a winding dirt "
        "road leading up the hill",
        "a bustling night market in the rain, paper lanterns glowing red and orange, reflections "
        "on the wet pavement, a vendor handing a bowl of noodles to a customer holding a "
        "transparent umbrella",
        "a still life painting in the style of the Dutch masters: a silver goblet, half a lemon "
        "with its peel curling over the table edge, a loaf of bread and a dead pheasant on a "
        "dark wooden table against a black background",
        "a futuristic greenhouse on Mars with rows of tomato plants under violet grow lights, "
        "an astronaut kneeling to inspect a seedling, and the dusty red horizon visible through "
        "the curved glass dome",
        "a watercolour illustration of a child and an old man flying a kite shaped like a fish "
        "on a windy beach, gulls overhead, the tide going out and a striped beach hut behind them",
    ],
}


def builtin_prompts() -> list[Prompt]:
    """The 32 built-in prompts, categories interleaved so any first N covers every category."""
    columns = [[Prompt(text, category) for text in texts] for category, texts in _BUILTIN.items()]
    out: list[Prompt] = []
    for i in range(max(len(c) for c in columns)):
        out.extend(column[i] for column in columns if i < len(column))
    return out


def load_prompts(spec: str | None = BUILTIN, num: int | None = None, base_dir: str | Path | None = None) -> list[Prompt]:
    """The first ``num`` prompts (all if None) of the set ``spec`` names.

    ``spec`` is ``"builtin"``, a file (``.txt`` one prompt a line, ``.json`` a list of strings or
    of objects with a ``prompt`` key, ``.jsonl``, ``.csv`` / ``.tsv`` with a ``prompt`` column),
    or a Hub dataset: ``hf://datasets/ORG/NAME`` or plain ``ORG/NAME`` when no such local path exists.
    Relative paths are taken from ``base_dir`` (the manifest's folder) when given.
    """
    if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
        raise SettingsError("evaluate.num_prompts", num, "a positive integer")
    spec = spec or BUILTIN
    if spec == BUILTIN:
        prompts = builtin_prompts()
    else:
        path = Path(spec).expanduser()
        if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).exists():
            path = Path(base_dir) / path
        if path.exists():
            prompts = _read_file(path)
        elif spec.startswith(HF_DATASET_PREFIX) or (spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
                                                    and path.suffix not in FILE_SUFFIXES):
            prompts = _read_hub_dataset(spec.removeprefix(HF_DATASET_PREFIX))
        else:
            raise SettingsError(
                "evaluate.prompts", spec,
                f"'builtin', an existing prompt file ({', '.join(FILE_SUFFIXES)}) or a Hub dataset "
                "'hf://datasets/ORG/NAME'", hint=f"{path} does not exist",
            )
    if not prompts:
        raise PromptSetError(f"prompt set {spec!r} holds no prompts")
    if num is not None:
        if num > len(prompts):
            raise SettingsError("evaluate.num_prompts", num, f"at most {len(prompts)}: the set {spec!r} has {len(prompts)} prompts")
        prompts = prompts[:num]
    return prompts


def _read_file(path: Path) -> list[Prompt]:
    suffix = path.suffix.lower()
    if path.is_dir():
        raise SettingsError("evaluate.prompts", str(path), f"a prompt file ({', '.join(FILE_SUFFIXES)}), not a folder")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptSetError(f"{path}: cannot read the prompt file ({exc})") from exc
    try:
        return parse_prompts(text, suffix, str(path))
    except (ValueError, KeyError, TypeError) as exc:
        raise PromptSetError(f"{path}: {exc}") from exc


def parse_prompts(text: str, suffix: str, name: str = "<prompts>") -> list[Prompt]:
    """Prompts from the text of a ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` / ``.tsv`` file."""
    if suffix in (".txt", ""):
        return [Prompt(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            key = _find_key(data, _PROMPT_KEYS)
            if key is None:
                raise ValueError(f"a JSON object needs a 'prompts' list; keys are {sorted(data)}")
            data = data[key]
        if not isinstance(data, list):
            raise ValueError("JSON prompt files hold a list of strings or of objects with a 'prompt' key")
        return [_record_prompt(item, name, i) for i, item in enumerate(data)]
    if suffix == ".jsonl":
        return [_record_prompt(json.loads(line), name, i) for i, line in enumerate(text.splitlines()) if line.strip()]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        rows = list(reader)
        key = _find_key(dict.fromkeys(reader.fieldnames or []), _PROMPT_KEYS)
        if key is None:
            raise ValueError(f"no prompt column: columns are {reader.fieldnames}; name one 'prompt'")
        cat = _find_key(dict.fromkeys(reader.fieldnames or []), _CATEGORY_KEYS)
        return [Prompt(row[key].strip(), (row.get(cat) or None) if cat else None) for row in rows if (row.get(key) or "").strip()]
    raise ValueError(f"unsupported prompt file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _find_key(mapping: dict, names: tuple[str, ...]) -> str | None:
    lowered = {str(k).strip().lower(): k for k in mapping}
    return next((lowered[n] for n in names if n in lowered), None)


def _record_prompt(item, name: str, index: int) -> Prompt:
    if isinstance(item, str):
        return Prompt(item.strip())
    if isinstance(item, dict):
        key = _find_key(item, _PROMPT_KEYS)
        if key is not None and isinstance(item[key], str):
            cat = _find_key(item, _CATEGORY_KEYS)
            return Prompt(item[key].strip(), item.get(cat) if cat else None)
    raise ValueError(f"entry {index} of {name} is neither a string nor an object with a 'prompt' string")


def _read_hub_dataset(repo_id: str) -> list[Prompt]:
    """Fetch a dataset repo's prompt files with huggingface_hub (the datasets library is not needed).

    Offline (``HF_HUB_OFFLINE=1`` or no network) only an already cached snapshot is used.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [f"*{s}" for s in FILE_SUFFIXES if s != ".txt"] + ["*.txt"]
    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns))
    except RepositoryNotFoundError as exc:
        raise PromptSetError(f"evaluate.prompts: no Hub dataset {repo_id!r} (or it is private: log in or set HF_TOKEN)") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise PromptSetError(
            f"evaluate.prompts: cannot fetch the Hub dataset {repo_id!r} ({type(exc).__name__}); offline, it must "
            "already be in the Hugging Face cache; or download its prompt file and pass the file's path"
        ) from exc
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
                   and p.name.lower() not in ("readme.txt", "license.txt"))
    if not files:
        raise PromptSetError(
            f"Hub dataset {repo_id!r} has no csv/tsv/json/jsonl/txt file (parquet-only datasets need the "
            "'datasets' library: download its prompts as a file and pass its path)"
        )
    prompts: list[Prompt] = []
    for path in files:
        prompts.extend(_read_file(path))
    return prompts
