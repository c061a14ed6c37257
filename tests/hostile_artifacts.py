"""A corpus of hostile artifacts, each made by code from one good tiny artifact.

Every case copies the good artifact, changes it the way an attacker (or a broken tool) would,
and says what the loader's error must mention. ``outside`` is a folder next to the copy holding
bait files (a config, a safetensors file, a whole component folder) that no load may open.

    >>> for case in CASES:
    ...     root = case.make(good, tmp / case.name, outside)
    ...     with pytest.raises(ArtifactError, match=case.match): smash_runtime.load(root)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smash_runtime.format import RECORD_FILE, file_entry

TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Path, Path], None]  # (artifact copy, outside folder)
    match: str  # regex the ArtifactError's message must contain
    needs_shards: bool = False

    def make(self, good: Path, dest: Path, outside: Path) -> Path:
        shutil.copytree(good, dest, symlinks=True)
        self.mutate(dest, outside)
        return dest


def make_outside(folder: Path, good: Path) -> Path:
    """Bait beside the artifacts: copies of real artifact files, so hashes and sizes can match."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(good / "transformer" / "config.json", folder / "config.json")
    shutil.copy(sorted((good / "vae").glob("*.safetensors"))[0], folder / "weights.safetensors")
    shutil.copytree(good / "vae", folder / "vae", dirs_exist_ok=True)
    shutil.copy(good / RECORD_FILE, folder / RECORD_FILE)
    return folder


# --- editing helpers ---------------------------------------------------------------------------

def record(root: Path) -> dict:
    return json.loads((root / RECORD_FILE).read_text())


def write_record(root: Path, data) -> None:
    (root / RECORD_FILE).write_text(json.dumps(data))


def edit_record(fn: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def mutate(root: Path, outside: Path) -> None:
        data = record(root)
        fn(data)
        write_record(root, data)
    return mutate


def relist(root: Path, *rels: str) -> None:
    """Record the current size and sha256 of ``rels``: the hostile artifact is self-consistent."""
    data = record(root)
    for rel in rels:
        path = root / rel
        data["files"][rel] = file_entry(path=path)
    write_record(root, data)


def edit_json(rel: str, fn: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def mutate(root: Path, outside: Path) -> None:
        data = json.loads((root / rel).read_text())
        fn(data)
        (root / rel).write_text(json.dumps(data))
        relist(root, rel)
    return mutate


def list_outside(path_in_record: Callable[[Path], str]) -> Callable[[Path, Path], None]:
    """List an outside file (with its true hash and size) under a path that reaches it."""
    def mutate(root: Path, outside: Path) -> None:
        data = record(root)
        target = outside / "config.json"
        data["files"][path_in_record(outside)] = file_entry(path=target)
        write_record(root, data)
    return mutate


def symlink(rel: str, to: Callable[[Path, Path], Path]) -> Callable[[Path, Path], None]:
    def mutate(root: Path, outside: Path) -> None:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        os.symlink(to(root, outside), path)
    return mutate


def rename_component(new: str) -> Callable[[Path, Path], None]:
    def fn(data: dict) -> None:
        data["components"][new] = data["components"].pop("vae")
    return edit_record(fn)


def set_component(name: str, key: str, value) -> Callable[[Path, Path], None]:
    def fn(data: dict) -> None:
        if value is _DELETE:
            del data["components"][name][key]
        else:
            data["components"][name][key] = value
    return edit_record(fn)


_DELETE = object()


def rewrite_tensors(rel: str, fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path, Path], None]:
    def mutate(root: Path, outside: Path) -> None:
        tensors = load_file(root / rel)
        fn(tensors)
        save_file(tensors, root / rel, metadata={"format": "pt"})
        relist(root, rel)
    return mutate


def _first_float(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(tensors) if tensors[k].dtype.is_floating_point and tensors[k].dim() == 4)


def _bad_shape(tensors):
    key = _first_float(tensors)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])


def _bad_dtype(tensors):
    key = _first_float(tensors)
    tensors[key] = torch.zeros(tensors[key].shape, dtype=torch.int32)


def _drop_tensor(tensors):
    del tensors[_first_float(tensors)]


def shard_index(fn: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    return edit_json("transformer/diffusion_pytorch_model.safetensors.index.json", fn)


def _first_shard_to(value: str) -> Callable[[dict], None]:
    def fn(index: dict) -> None:
        key = sorted(index["weight_map"])[0]
        index["weight_map"][key] = value
    return fn


def unlisted_shard(root: Path, outside: Path) -> None:
    index_rel = "transformer/diffusion_pytorch_model.safetensors.index.json"
    first = sorted(json.loads((root / index_rel).read_text())["weight_map"].values())[0]
    shutil.copy(root / "transformer" / first, root / "transformer" / "extra.safetensors")
    shard_index(_first_shard_to("extra.safetensors"))(root, outside)


def pickle_route(root: Path, outside: Path) -> None:
    """The issue's pickle route: an unlisted .bin beside the weights, and a kind that would reach it."""
    torch.save({"x": torch.zeros(1)}, root / "vae" / "diffusion_pytorch_model.bin")
    set_component("vae", "kind", "pretrained")(root, outside)


def bin_instead_of_safetensors(root: Path, outside: Path) -> None:
    (root / VAE_WEIGHTS).unlink()
    torch.save({"x": torch.zeros(1)}, root / "vae" / "diffusion_pytorch_model.bin")
    data = record(root)
    del data["files"][VAE_WEIGHTS]
    write_record(root, data)
    relist(root, "vae/diffusion_pytorch_model.bin")


def raw(text: bytes) -> Callable[[Path, Path], None]:
    def mutate(root: Path, outside: Path) -> None:
        (root / RECORD_FILE).write_bytes(text)
    return mutate


def deep_record(root: Path, outside: Path) -> None:
    text = (root / RECORD_FILE).read_text()
    text = text.rstrip().rstrip("}") + ', "runtime_extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (root / RECORD_FILE).write_text(text)


def huge_record(root: Path, outside: Path) -> None:
    with open(root / RECORD_FILE, "ab") as f:
        f.write(b" " * (33 * 1024 * 1024))


def unlist(rel: str) -> Callable[[Path, Path], None]:
    def fn(data: dict) -> None:
        del data["files"][rel]
    return edit_record(fn)


def _files_as_list(data):
    data["files"] = sorted(data["files"])


def _set(key: str, value) -> Callable[[Path, Path], None]:
    def fn(data: dict) -> None:
        data[key] = value
    return edit_record(fn)


def _file_field(rel: str, key: str, value) -> Callable[[Path, Path], None]:
    def fn(data: dict) -> None:
        data["files"][rel][key] = value
    return edit_record(fn)


def _custom_part(index: dict) -> None:
    index["transformer"] = ["my_pipeline_module", "EvilTransformer"]


CASES: list[Case] = [
    # -- traversal through the file table --------------------------------------------------------
    Case("files-dotdot", list_outside(lambda o: "../outside/config.json"), r"files\['\.\./outside/config.json'\] \(the key\).*'\.\.' part"),
    Case("files-dotdot-inside-path", list_outside(lambda o: "transformer/../../outside/config.json"), r"'\.\.' part"),
    Case("files-absolute", list_outside(lambda o: str(o / "config.json")), r"is absolute"),
    Case("files-drive-letter", list_outside(lambda o: "C:/outside/config.json"), r"is absolute"),
    Case("files-backslash", list_outside(lambda o: "..\\outside\\config.json"), r"is absolute"),
    Case("files-dot-part", list_outside(lambda o: "transformer/./config.json"), r"'\.' or '\.\.' part|'\.\.' part"),
    Case("files-empty-part", list_outside(lambda o: "transformer//config.json"), r"empty"),
    Case("files-control-char", list_outside(lambda o: "transformer/con\nfig.json"), r"control characters"),
    # -- symlinks ------------------------------------------------------------------------------------
    Case("symlink-config-outside", symlink("transformer/config.json", lambda r, o: o / "config.json"),
         r"transformer/config.json: is a symlink"),
    Case("symlink-weights-outside", symlink(VAE_WEIGHTS, lambda r, o: o / "weights.safetensors"), r"is a symlink"),
    Case("symlink-component-folder", symlink("vae", lambda r, o: o / "vae"), r"folder vae is a symlink"),
    Case("symlink-inside-artifact", symlink("tokenizer/tokenizer.json", lambda r, o: r / "tokenizer_2" / "tokenizer.json"),
         r"tokenizer/tokenizer.json: is a symlink"),
    Case("symlink-record", symlink(RECORD_FILE, lambda r, o: o / RECORD_FILE), r"smash.json.*is a symlink"),
    # -- component names ----------------------------------------------------------------------------
    Case("component-name-dotdot", rename_component("../outside/vae"), r"components.*not a plain identifier"),
    Case("component-name-absolute", rename_component("/tmp/vae"), r"not a plain identifier"),
    Case("component-name-nested", rename_component("vae/inner"), r"not a plain identifier"),
    Case("component-name-empty", rename_component(""), r"not a plain identifier"),
    # -- shard index ---------------------------------------------------------------------------------
    Case("shard-dotdot", shard_index(_first_shard_to("../../outside/weights.safetensors")), r"index.json.*weight_map",
         needs_shards=True),
    Case("shard-absolute", shard_index(_first_shard_to("/etc/passwd.safetensors")), r"index.json.*weight_map",
         needs_shards=True),
    Case("shard-nested", shard_index(_first_shard_to("sub/x.safetensors")), r"index.json.*weight_map", needs_shards=True),
    Case("shard-pickle", shard_index(_first_shard_to("diffusion_pytorch_model.bin")), r"\.safetensors file",
         needs_shards=True),
    Case("shard-map-not-a-table", shard_index(lambda index: index.update(weight_map=["a"])), r"weight_map",
         needs_shards=True),
    Case("shard-unlisted", unlisted_shard, r"extra.safetensors.*not listed", needs_shards=True),
    # -- closed enums, checked before any file is read ----------------------------------------------
    Case("kind-unknown", set_component("vae", "kind", "pretrained"), r"components\.vae\.kind"),
    Case("kind-empty", set_component("vae", "kind", ""), r"components\.vae\.kind"),
    Case("kind-null", set_component("vae", "kind", None), r"components\.vae\.kind"),
    Case("kind-missing", set_component("vae", "kind", _DELETE), r"components\.vae\.kind.*Field required"),
    Case("kind-model-for-tokenizer", set_component("tokenizer", "kind", "model"), r"cannot be loaded as kind 'model'"),
    Case("kind-config-for-model", set_component("transformer", "kind", "config"), r"cannot be loaded as kind 'config'"),
    Case("kind-tokenizer-for-scheduler", set_component("scheduler", "kind", "tokenizer"), r"kind 'tokenizer'"),
    Case("library-torch", set_component("vae", "library", "torch"), r"components\.vae\.library"),
    Case("library-os", set_component("vae", "library", "os"), r"components\.vae\.library"),
    Case("class-unknown", set_component("vae", "class", "NoSuchModel"), r"components\.vae\.class: diffusers .* has no class 'NoSuchModel'"),
    Case("class-dunder", set_component("vae", "class", "__loader__"), r"has no class|cannot be loaded"),
    Case("class-not-an-identifier", set_component("vae", "class", "os.system"), r"components\.vae\.class"),
    Case("class-pipeline-as-model", set_component("vae", "class", "DiffusionPipeline"), r"cannot be loaded as kind"),
    Case("quantization-unknown", set_component("transformer", "quantization", {"method": "pickle"}),
         r"quantization\.method"),
    Case("dtype-unknown", _set("dtype", "float64"), r"field dtype"),
    Case("format-unknown", _set("format", "other"), r"expected \"format\""),
    Case("format-version-string", _set("format_version", "1"), r"version '1' is not supported"),
    Case("pipeline-class-mismatch", _set("pipeline_class", "StableDiffusionXLPipeline"), r"_class_name.*differs"),
    Case("pickle-route-kind", pickle_route, r"components\.vae\.kind"),
    Case("bin-weights", bin_instead_of_safetensors, r"vae/diffusion_pytorch_model.safetensors.*not listed"),
    # -- remote code ---------------------------------------------------------------------------------
    Case("auto-map-model-config", edit_json("transformer/config.json", lambda c: c.update(auto_map={"AutoModel": "x.Y"})),
         r"transformer/config.json: field 'auto_map'"),
    Case("auto-map-tokenizer", edit_json("tokenizer/tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["x.T", None]})),
         r"tokenizer_config.json: field 'auto_map'"),
    Case("custom-pipeline", edit_json("model_index.json", lambda c: c.update(custom_pipeline="evil")),
         r"model_index.json: field 'custom_pipeline'"),
    Case("trust-remote-code", edit_json("scheduler/scheduler_config.json", lambda c: c.update(trust_remote_code=True)),
         r"field 'trust_remote_code'"),
    Case("custom-component-class", edit_json("model_index.json", _custom_part), r"model_index.json: component 'transformer'"),
    # -- headers that disagree with the structure -----------------------------------------------------
    Case("header-shape", rewrite_tensors(VAE_WEIGHTS, _bad_shape), r"vae/diffusion_pytorch_model.safetensors: tensor .* has shape"),
    Case("header-dtype", rewrite_tensors(VAE_WEIGHTS, _bad_dtype), r"is stored as torch.int32"),
    Case("header-missing-tensor", rewrite_tensors(VAE_WEIGHTS, _drop_tensor), r"do not match the component's structure"),
    Case("config-wrong-for-class", edit_json("vae/config.json", lambda c: c.update(block_out_channels="many")),
         r"vae/config.json|do not match|has shape"),
    # -- required files not listed ---------------------------------------------------------------------
    Case("model-index-unlisted", unlist("model_index.json"), r"model_index.json: .*not listed"),
    Case("config-unlisted", unlist("vae/config.json"), r"vae/config.json: .*not listed"),
    # -- malformed smash.json of every type mistake ------------------------------------------------------
    Case("record-not-json", raw(b"{not json"), r"not valid JSON"),
    Case("record-not-utf8", raw(b'{"format": "\xff"}'), r"not UTF-8"),
    Case("record-array", raw(b"[]"), r"expected a JSON object"),
    Case("record-deep", deep_record, r"nested \d+ levels deep"),
    Case("record-huge", huge_record, r"larger than"),
    Case("files-as-list", edit_record(_files_as_list), r"field files"),
    Case("components-as-string", _set("components", "vae"), r"field components"),
    Case("runtime-as-string", _set("runtime", "fast please"), r"field runtime"),
    Case("files-sha-not-hex", _file_field(VAE_WEIGHTS, "sha256", "z" * 64), r"files\['vae/diffusion_pytorch_model.safetensors'\]\.sha256"),
    Case("files-blake3-not-hex", _file_field(VAE_WEIGHTS, "blake3", "Z" * 64), r"files\['vae/diffusion_pytorch_model.safetensors'\]\.blake3"),
    Case("files-blake3-of-other-bytes", _file_field(VAE_WEIGHTS, "blake3", "0" * 64), r"vae/diffusion_pytorch_model.safetensors: blake3 does not match"),
    Case("files-size-negative", _file_field(VAE_WEIGHTS, "size", -1), r"size"),
    Case("files-size-string", _file_field(VAE_WEIGHTS, "size", "big"), r"size"),
    Case("unknown-top-level-field", _set("loader_hook", "os.system"), r"loader_hook.*Extra inputs"),
    Case("pipeline-class-number", _set("pipeline_class", 7), r"pipeline_class"),
    # -- recorded runtime settings outside what the settings models allow --------------------------------
    Case("warmup-shape-2-to-the-40", _set("runtime", {"warmup": {"shapes": [
        {"height": 2 ** 40, "width": 64, "steps": 2, "batch": 1}]}}), r"runtime\.warmup.*height"),
    Case("warmup-batch-huge", _set("runtime", {"warmup": {"shapes": [
        {"height": 64, "width": 64, "steps": 2, "batch": 100_000}]}}), r"runtime\.warmup.*batch"),
    Case("cacher-unknown-name", _set("runtime", {"cacher": {"name": "os.system"}}), r"runtime\.cacher.*name"),
    Case("cacher-interval-string", _set("runtime", {"cacher": {"name": "fora", "interval": "3; rm -rf"}}),
         r"runtime\.cacher.*interval"),
    Case("compiler-unknown-mode", _set("runtime", {"compiler": {"name": "torch_compile", "mode": "eval"}}),
         r"runtime\.compiler.*mode"),
]


# Unlisted files next to listed ones: not refused (a Hub snapshot may legitimately hold files of
# other downloads) but never read; a test proves the load ignores them.
UNLISTED: dict[str, bytes] = {
    "tokenizer/added_tokens.json": json.dumps({"<evil>": 3}).encode(),
    "tokenizer/special_tokens_map.json": json.dumps({"pad_token": "<evil>", "bos_token": "a"}).encode(),
    "tokenizer/vocab.json": b"{}",
    "scheduler/scheduler_config.json.bak": b"{}",
    "vae/diffusion_pytorch_model.bin": b"not even a pickle",
    "vae/config.json.orig": b"{}",
    "transformer/diffusion_pytorch_model.safetensors.index.json": json.dumps({"weight_map": {"x": "../../outside/weights.safetensors"}}).encode(),
    "unknown_component/config.json": b"{}",
}
