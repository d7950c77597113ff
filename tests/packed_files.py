"""Crafting ``.dfmpc`` files as someone who edits one would: change the metadata or the tensors, and recompute the
SHA-256 (a checksum anyone can redo, not a signature)."""
import hashlib
import json

__all__ = ["checksum", "read_parts", "write_parts", "rewrite"]


def checksum(meta, tensors):
    """The file's SHA-256 as the format defines it: the metadata but the digest as sorted compact JSON, then
    every tensor's name, a zero byte and its bytes, in name order (what someone who edits a file can redo)."""
    fields = {k: v for k, v in meta.items() if k != "sha256"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_parts(path):
    """The metadata (parsed) and the tensors of a packed file, read without dfmpc's checks."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["dfmpc"]), {k: f.get_tensor(k) for k in f.keys()}


def write_parts(path, meta, tensors, sign=True, replace=None):
    """Write metadata and tensors as a packed file, with the checksum recomputed if ``sign``; ``replace``:
    (old, new) text replaced in the metadata's JSON after it is written (for what json.dumps cannot write, such
    as nesting 5,000 deep)."""
    from safetensors.torch import save_file

    if sign:
        meta = {**meta, "sha256": checksum(meta, tensors)}
    text = json.dumps(meta)
    if replace:
        text = text.replace(*replace)
    save_file(tensors, str(path), metadata={"dfmpc": text})


def rewrite(path, change_meta=None, change_tensors=None, sign=True):
    """Rewrite the file with its metadata and tensors changed, and its checksum recomputed if ``sign``."""
    meta, tensors = read_parts(path)
    (change_meta or (lambda m: None))(meta)
    (change_tensors or (lambda t: None))(tensors)
    write_parts(path, meta, tensors, sign)
